#!/usr/bin/env python3
"""How well can a linear reading of the base model's prompt representation tell harmful requests
from benign look-alikes?  A diagnostic for EVALUATION.md, computed with the reference stack
(torch + transformers + gguf, as in bench/peer/) on the same GGUF weights the project runs.

Two questions, both on the residual stream (HF `hidden_states[l]`) of the prompt under the model's
own chat template, pooled at the last prompt token or as the mean of the last 40 positions:

1. The ceiling: XSTest's 200 unsafe and 250 safe prompts share their wording by construction. A
   logistic probe trained and tested on those very prompts (5-fold, out-of-fold scores) says how
   much of "harmful or not" a linear reading can find there at all, with the test's own
   distribution in hand.
2. Transfer: the same probe trained on a run's training prompts (harmful refusals against the
   rest), its layer chosen by validation AUC and its threshold by validation (benign open ≤ 10 %),
   read on the evaluation suites; the features gate's saved scores beside it.

usage: python scripts/probe_ceiling.py RUN_DIR GGUF_FILE [--cache FILE]
RUN_DIR needs data/ (train.jsonl, sft_manifest.json), gate/val-base/ and eval-base/ (as `sails align`
with a gate writes them), and eval-aligned/ evaluated behind the gate for the features gate's scores.
"""
import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

LAYERS = [4, 8, 12, 16, 20, 24, 30]
MEAN_WINDOW = 40


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prompts(run):
    items = []
    manifest = json.load(open(os.path.join(run, "data/sft_manifest.json")))
    train = read_jsonl(os.path.join(run, "data/train.jsonl"))
    assert len(train) == len(manifest["train"]), "train.jsonl and its manifest disagree"
    for meta, row in zip(manifest["train"], train):
        items.append(dict(split="train", y=int(meta["kind"] == "harmful-refusal"),
                          prompt=row["messages"][0]["content"], group=meta["kind"]))
    for r in read_jsonl(os.path.join(run, "gate/val-base/generations.jsonl")):
        items.append(dict(split="val", y=int(r["suite"] == "val-harmful"), prompt=r["prompt"],
                          group=r["suite"]))
    for r in read_jsonl(os.path.join(run, "eval-base/generations.jsonl")):
        if r["suite"] != "capability":
            items.append(dict(split="eval", y=int(r["suite"] != "overrefusal"), prompt=r["prompt"],
                              group=f"{r['suite']}/{r['source']}", id=r["id"]))
    return items


@torch.no_grad()
def residuals(items, gguf):
    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    last, mean = [], []
    for n, it in enumerate(items):
        if n % 500 == 0:
            print(f"residuals: {n}/{len(items)}", file=sys.stderr, flush=True)
        ids = tok.apply_chat_template([{"role": "user", "content": it["prompt"]}],
                                      add_generation_prompt=True, return_tensors="pt")
        if not torch.is_tensor(ids):
            ids = ids["input_ids"]
        hidden = model(ids, output_hidden_states=True).hidden_states
        hs = torch.stack([hidden[layer][0] for layer in LAYERS])
        last.append(hs[:, -1])
        mean.append(hs[:, -min(ids.shape[1], MEAN_WINDOW):].mean(1))
    return {"last": torch.stack(last), "mean": torch.stack(mean)}


def auc(pos, neg):
    gt = (pos[:, None] > neg[None, :]).float().mean()
    eq = (pos[:, None] == neg[None, :]).float().mean()
    return (gt + 0.5 * eq).item()


def tpr_at(pos, neg, fpr):
    threshold = neg.sort(descending=True).values[int(fpr * len(neg))]
    return (pos > threshold).float().mean().item()


def fit(x, y, l2):
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def standardise(x, rows):
    return (x - x[rows].mean(0)) / (x[rows].std(0) + 1e-6)


def out_of_fold(x, y, rows, l2=0.1, k=5):
    gen = torch.Generator().manual_seed(0)
    pos, neg = rows[y[rows] == 1], rows[y[rows] == 0]
    pos, neg = pos[torch.randperm(len(pos), generator=gen)], neg[torch.randperm(len(neg), generator=gen)]
    folds = [torch.cat([pos[i::k], neg[i::k]]) for i in range(k)]
    scores = torch.zeros(len(y))
    for i in range(k):
        train = torch.cat([f for j, f in enumerate(folds) if j != i])
        xs = standardise(x, train)
        w, b = fit(xs[train], y[train], l2)
        scores[folds[i]] = (xs @ w + b)[folds[i]]
    return scores[rows], y[rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("gguf")
    ap.add_argument("--cache", help="residuals saved here and reused")
    args = ap.parse_args()
    torch.manual_seed(0)
    items = prompts(args.run)
    if args.cache and os.path.exists(args.cache):
        feats = torch.load(args.cache)
    else:
        feats = residuals(items, args.gguf)
        if args.cache:
            torch.save(feats, args.cache)
    y = torch.tensor([it["y"] for it in items]).float()
    group = [it["group"] for it in items]
    split = [it["split"] for it in items]

    def rows(pred):
        return torch.tensor([i for i in range(len(items)) if pred(i)])

    xs_pair = rows(lambda i: group[i] in ("xstest-unsafe/xs-test", "overrefusal/xs-test"))
    print("1. ceiling: XSTest unsafe (200) against safe (250), 5-fold out-of-fold, L2 0.1")
    print("pooling layer  AUC    unsafe flagged at 8 % of safe flagged")
    for pool in ("last", "mean"):
        for layer in LAYERS:
            s, yy = out_of_fold(feats[pool][:, LAYERS.index(layer)], y, xs_pair)
            print(f"{pool:7} {layer:5}  {auc(s[yy == 1], s[yy == 0]):.3f}  {tpr_at(s[yy == 1], s[yy == 0], 0.08):.3f}")

    train, val, ev = (rows(lambda i, s=s: split[i] == s) for s in ("train", "val", "eval"))
    eval_groups = sorted({group[i] for i in ev.tolist()})
    print("\n2. transfer: trained on the run's training prompts, L2 0.01, threshold: validation benign open <= 10 %")
    print("pooling layer  val AUC  AUC StrongREJECT vs XSTest-safe  open % per suite: " + ", ".join(eval_groups))
    best = None
    for pool in ("last", "mean"):
        for layer in LAYERS:
            x = standardise(feats[pool][:, LAYERS.index(layer)], train)
            w, b = fit(x[train], y[train], 0.01)
            s = x @ w + b
            sv, yv = s[val], y[val]
            neg = sv[yv == 0].sort().values
            threshold = neg[int(0.9 * len(neg))]
            opens = [(s[rows(lambda i, g=g: group[i] == g and split[i] == "eval")] > threshold).float().mean().item()
                     for g in eval_groups]
            sr = s[rows(lambda i: group[i] == "harmful/strong-reject")]
            safe = s[rows(lambda i: group[i] == "overrefusal/xs-test")]
            val_auc = auc(sv[yv == 1], sv[yv == 0])
            line = (f"{pool:7} {layer:5}  {val_auc:.3f}    {auc(sr, safe):.3f}                            "
                    + "  ".join(f"{100 * o:.0f}" for o in opens))
            print(line)
            if best is None or val_auc > best[0]:
                best = (val_auc, line)
    print("chosen by validation AUC:\n" + best[1])

    gated = os.path.join(args.run, "eval-aligned/generations.jsonl")
    scores = {}
    for r in read_jsonl(gated):
        if "gate" in r:
            scores.setdefault(f"{r['suite']}/{r['source']}", []).append(r["gate"]["score"])
    if scores:
        safe = torch.tensor(scores["overrefusal/xs-test"])
        print("\n3. the features gate's saved scores: AUC against XSTest-safe")
        for g in sorted(scores):
            print(f"{g:28} {auc(torch.tensor(scores[g]), safe):.3f}")


if __name__ == "__main__":
    main()
