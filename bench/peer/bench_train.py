#!/usr/bin/env python3
"""LoRA SFT step / forward-only benchmark (the peer figures in BENCHMARKS.md).

--config all7   : LoRA r16 alpha32 dropout0 on q,k,v,o,gate,up,down (expect 4,884,480 trainable)
--config qkvo   : LoRA r16 alpha32 dropout0 on q,k,v,o               (expect 1,843,200 trainable)
--config forward: base model forward only under torch.no_grad()
--autocast bf16 : forward (and loss) under torch.autocast("cpu", dtype=torch.bfloat16)

Batch 4 x 128 tokens (512 tokens/step) cut from chat-formatted alpaca_en_demo.json,
loss over all tokens (labels = input_ids), torch.optim.AdamW(lr=2e-4) over LoRA params.
One step = forward + loss + backward + optimizer.step (+ zero_grad).
Prints one JSON line on stdout; progress on stderr. Run one config per process so that
peak RSS (ru_maxrss) belongs to that config.
"""
import argparse
import contextlib
import json
import time

import peer_common as pc
import torch

TARGETS = {
    "all7": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def make_blocks(tok, batch, seq, n_batches):
    with open(pc.ALPACA) as f:
        data = json.load(f)
    ids = []
    need = batch * seq * n_batches
    for ex in data:
        user = ex["instruction"] + (("\n\n" + ex["input"]) if ex.get("input") else "")
        text = tok.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}],
            tokenize=False,
        )
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:  # cycle if ever needed
        ids = (ids * (need // len(ids) + 1))
    t = torch.tensor(ids[:need], dtype=torch.long).view(n_batches, batch, seq)
    return [t[i] for i in range(n_batches)]



def forward(model, x, ac):
    """Forward with the loss over all tokens, under the autocast context `ac` when given."""
    with ac() if ac else contextlib.nullcontext():
        return model(input_ids=x, labels=x, use_cache=False)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=["all7", "qkvo", "forward"], default="all7")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pc.setup_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    tok = pc.load_tokenizer()
    model, load_s = pc.load_model()
    n_total = sum(p.numel() for p in model.parameters())
    n_batches = args.warmup + args.steps
    blocks = make_blocks(tok, args.batch, args.seq, n_batches)
    tokens_per_step = args.batch * args.seq
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.autocast == "bf16" else None

    res = {
        "bench": "train" if args.config != "forward" else "forward",
        "config": args.config,
        "autocast": args.autocast,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": tokens_per_step,
        "warmup": args.warmup,
        "steps": args.steps,
        "model_params": n_total,
        "load_s": round(load_s, 3),
    }

    times, fwd_t, bwd_t, opt_t, losses = [], [], [], [], []
    if args.config == "forward":
        model.eval()
        with torch.no_grad():
            for i, x in enumerate(blocks):
                t0 = time.perf_counter()
                out = forward(model, x, ac)
                dt = time.perf_counter() - t0
                losses.append(float(out.loss))
                pc.log(f"fwd {i} {'warmup' if i < args.warmup else 'timed'} {dt:.3f}s loss {losses[-1]:.4f}")
                if i >= args.warmup:
                    times.append(dt)
        res["trainable_params"] = 0
    else:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                         target_modules=TARGETS[args.config], task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        res["trainable_params"] = sum(p.numel() for p in trainable)
        res["lora"] = {"r": args.r, "alpha": args.alpha, "dropout": 0.0, "targets": TARGETS[args.config]}
        opt = torch.optim.AdamW(trainable, lr=args.lr)
        for i, x in enumerate(blocks):
            t0 = time.perf_counter()
            out = forward(model, x, ac)
            loss = out.loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            dt = t3 - t0
            losses.append(loss.detach().item())
            pc.log(f"step {i} {'warmup' if i < args.warmup else 'timed'} {dt:.3f}s "
                   f"(fwd {t1-t0:.3f} bwd {t2-t1:.3f} opt {t3-t2:.3f}) loss {losses[-1]:.4f}")
            if i >= args.warmup:
                times.append(dt)
                fwd_t.append(t1 - t0)
                bwd_t.append(t2 - t1)
                opt_t.append(t3 - t2)
        res["fwd_s_median"] = pc.median(fwd_t)
        res["bwd_s_median"] = pc.median(bwd_t)
        res["opt_s_median"] = pc.median(opt_t)

    med = pc.median(times)
    res.update({
        "step_s": [round(t, 4) for t in times],
        "median_s": med,
        "tokens_per_s": (tokens_per_step / med) if med else None,
        "losses": [round(l, 4) for l in losses],
        "wall_s_total": round(time.perf_counter() - t_start, 2),
    })
    pc.emit(res)


if __name__ == "__main__":
    main()
