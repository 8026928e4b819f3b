#!/usr/bin/env python3
"""Greedy generation with KV cache (the peer figures in BENCHMARKS.md).

model.generate(do_sample=False, max_new_tokens=64, min_new_tokens=64); prompt = chat template
(default system prompt) around a short user message: batch 1 = 35 tokens; batch 8 = eight
different messages of 34-38 tokens, left-padded. Throughput = batch * new_tokens / wall time
of the whole generate call (prefill included). Prefill = one forward over the (padded) prompt
batch with use_cache=True, timed separately.
Prints one JSON line on stdout.
"""
import argparse
import time

import peer_common as pc
import torch

# token counts with the default system prompt: 35,34,36,35,36,38,35,37
MESSAGES = [
    "Tell me a joke.",
    "What is AI?",
    "Hello, how are you?",
    "Tell me a story.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "Give me a recipe.",
    "What is the capital of France?",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show", action="store_true", help="include decoded outputs in the JSON")
    args = ap.parse_args()

    pc.setup_threads(args.threads)
    t_start = time.perf_counter()
    tok = pc.load_tokenizer(padding_side="left")
    model, load_s = pc.load_model()
    model.eval()

    msgs = [MESSAGES[i % len(MESSAGES)] for i in range(args.batch)]
    prompts = [pc.chat_prompt(tok, m) for m in msgs]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_lens = [int(l) for l in enc["attention_mask"].sum(1)]
    P = enc["input_ids"].shape[1]
    gen_kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                      pad_token_id=tok.pad_token_id, use_cache=True)

    times, out = [], None
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            out = model.generate(**enc, **gen_kwargs)
            dt = time.perf_counter() - t0
            pc.log(f"generate {i} {'warmup' if i < args.warmup else 'timed'} {dt:.3f}s "
                   f"-> {args.batch * (out.shape[1] - P) / dt:.1f} tok/s")
            if i >= args.warmup:
                times.append(dt)
        new_tokens = out.shape[1] - P
        assert new_tokens == args.new_tokens, (new_tokens, args.new_tokens)

        prefill = []
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            model(**enc, use_cache=True)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                prefill.append(dt)

    med = pc.median(times)
    res = {
        "bench": "generate",
        "batch": args.batch,
        "new_tokens": int(new_tokens),
        "prompt_tokens": prompt_lens,
        "padded_prompt_len": int(P),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "load_s": round(load_s, 3),
        "call_s": [round(t, 4) for t in times],
        "median_s": med,
        "new_tokens_per_s": args.batch * new_tokens / med,
        "new_tokens_per_s_each": [round(args.batch * new_tokens / t, 2) for t in times],
        "prefill_s": [round(t, 4) for t in prefill],
        "prefill_median_s": pc.median(prefill),
        "wall_s_total": round(time.perf_counter() - t_start, 2),
    }
    if args.show:
        res["outputs"] = tok.batch_decode(out[:, P:], skip_special_tokens=False)
    pc.emit(res)


if __name__ == "__main__":
    main()
