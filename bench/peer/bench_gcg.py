#!/usr/bin/env python3
"""GCG steps per second with nanoGCG 0.3.0, the peer of `sails attack gcg` (BENCHMARKS.md).

The same model (SmolLM2-135M-Instruct from the Q4_1 GGUF, dequantised to f32), behaviour, target
and settings as the sails run it is compared with: the first JailbreakBench behaviour, target
"Sure, here is", nanoGCG's default 20-token "x x … x" suffix, the request followed directly by
the suffix (nanoGCG's default placement), search width, top-k and steps from the arguments,
n_replace 1, prefix cache on, early stop off. nanoGCG needs transformers <= 4.47.1:

    python3 -m venv peer-gcg
    peer-gcg/bin/pip install torch==2.15.0 transformers==4.47.1 gguf==0.19.0 nanogcg==0.3.0
    peer-gcg/bin/python bench/peer/bench_gcg.py --steps 5 --search-width 256 --topk 64

A run of `--steps N` is timed against a run of one step with everything else equal, so the
per-step time excludes what a run does once (the banned-token list, the first loss). Prints one
JSON line on stdout.
"""
import argparse
import csv
import time

import peer_common as pc
import torch


def timed_run(model, tok, message, target, steps, args):
    import nanogcg
    from nanogcg import GCGConfig

    config = GCGConfig(
        num_steps=steps,
        search_width=args.search_width,
        topk=args.topk,
        n_replace=1,
        seed=args.seed,
        early_stop=False,
        verbosity="WARNING",
    )
    t0 = time.perf_counter()
    result = nanogcg.run(model, tok, message, target, config)
    return time.perf_counter() - t0, result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--search-width", type=int, default=256)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="Sure, here is")
    args = ap.parse_args()
    threads = pc.setup_threads(args.threads)
    tok = pc.load_tokenizer()
    model, load_s = pc.load_model()
    model.eval()
    with open(pc.JBB_CSV) as f:
        message = next(csv.DictReader(f))["Goal"]
    one_s, _ = timed_run(model, tok, message, args.target, 1, args)
    many_s, result = timed_run(model, tok, message, args.target, args.steps, args)
    per_step = (many_s - one_s) / (args.steps - 1)
    pc.emit(
        {
            "bench": "gcg",
            "peer": "nanogcg 0.3.0",
            "behaviour": message,
            "target": args.target,
            "steps": args.steps,
            "search_width": args.search_width,
            "topk": args.topk,
            "threads": threads,
            "load_s": round(load_s, 3),
            "run_1_step_s": round(one_s, 3),
            "run_s": round(many_s, 3),
            "seconds_per_step": round(per_step, 4),
            "steps_per_s": round(1.0 / per_step, 4),
            "best_loss": result.best_loss,
            "best_string": result.best_string,
            "losses": result.losses,
        }
    )


if __name__ == "__main__":
    main()
