"""Generates tests/fixtures/golden/tiny-llama-gcg/: the quantities one GCG step reads, computed
with PyTorch in float64 on the shared tiny Llama, without and with a LoRA adapter.

For a sequence  before ‖ suffix ‖ after ‖ target  (token ids), with the suffix given as a one-hot
matrix X (n_suffix × vocab) whose embedding is X @ E:

    loss      = mean over target tokens of −log softmax(logits)[target]   (logits at the positions
                that predict them: the last `len(target)` positions of  before ‖ suffix ‖ after ‖
                target[:-1])
    grad      = ∂loss/∂X                                                    (n_suffix × vocab)
    candidate_losses[i] = loss with the suffix replaced by candidates[i]

as src/attack/gcg.rs defines them (nanoGCG's `compute_token_gradient` and candidate loss). The
forward pass is an independent float64 Llama written here from the architecture (no transformers
code); `transformers.LlamaForCausalLM` in stock float32 computes the same gradient as a check and
as the scale of honest float32 error (recorded in meta.json). Central finite differences of the
loss along single one-hot entries check the autograd gradient.

Exact versions used for the committed files: Python 3.11.7, torch 2.15.0 (PyPI build, CPU, one
thread), transformers 4.47.1 (the float32 check only), safetensors 0.8.0.

    python3 -m venv /tmp/venv-gcg
    /tmp/venv-gcg/bin/pip install torch==2.15.0 transformers==4.47.1 safetensors==0.8.0
    /tmp/venv-gcg/bin/python tests/golden/make_gcg_golden.py --fixture ../shared/golden/tiny-llama

Run from the repository root. The adapter is the DPO golden's starting adapter
(tests/fixtures/golden/tiny-llama-dpo-step, r 4, alpha 8, all seven projections, A and B
non-zero), merged in float64 as W + (alpha/r)·B·A. Rerunning on these versions gives
byte-identical files.
"""

import argparse
import hashlib
import json
import math
import os
import platform

import safetensors
import safetensors.torch
import torch
import transformers

OUT_DEFAULT = "tests/fixtures/golden/tiny-llama-gcg"
ADAPTER_DIR = "tests/fixtures/golden/tiny-llama-dpo-step"
SEED = 7100
BEFORE, SUFFIX, AFTER, TARGET = 7, 5, 3, 4
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_weights(fixture, adapter):
    weights = {
        k: v.to(torch.float64)
        for k, v in safetensors.torch.load_file(os.path.join(fixture, "model.safetensors")).items()
    }
    if adapter is not None:
        with open(os.path.join(ADAPTER_DIR, "adapter_config.json")) as f:
            acfg = json.load(f)
        scale = acfg["lora_alpha"] / acfg["r"]
        lora = safetensors.torch.load_file(os.path.join(ADAPTER_DIR, "adapter_model.safetensors"))
        for layer in range(2):
            for proj, block in PROJECTIONS.items():
                key = f"base_model.model.model.layers.{layer}.{block}.{proj}"
                a = lora[f"{key}.lora_A.weight"].to(torch.float64)
                b = lora[f"{key}.lora_B.weight"].to(torch.float64)
                name = f"model.layers.{layer}.{block}.{proj}.weight"
                weights[name] = weights[name] + scale * (b @ a)
    return weights


def llama_logits(weights, cfg, embeds):
    """Logits (t, vocab) of one unpadded sequence given its input embeddings (t, d)."""
    n_h, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // n_h
    eps = cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    t = embeds.shape[0]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rotate(x):  # (heads, t, hd), rotate-half layout
        lo, hi = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), dim=-1)

    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    x = embeds
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, weights[p + "input_layernorm.weight"])
        q = (h @ weights[p + "self_attn.q_proj.weight"].T).view(t, n_h, hd).transpose(0, 1)
        k = (h @ weights[p + "self_attn.k_proj.weight"].T).view(t, n_kv, hd).transpose(0, 1)
        v = (h @ weights[p + "self_attn.v_proj.weight"].T).view(t, n_kv, hd).transpose(0, 1)
        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(n_h // n_kv, dim=0)
        v = v.repeat_interleave(n_h // n_kv, dim=0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
        x = x + attn.transpose(0, 1).reshape(t, n_h * hd) @ weights[p + "self_attn.o_proj.weight"].T
        h = rms(x, weights[p + "post_attention_layernorm.weight"])
        gate = h @ weights[p + "mlp.gate_proj.weight"].T
        up = h @ weights[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ weights[p + "mlp.down_proj.weight"].T
    x = rms(x, weights["model.norm.weight"])
    return x @ weights["model.embed_tokens.weight"].T


def target_loss(logits_fn, embed, problem, suffix_onehot):
    before, after, target = problem["before"], problem["after"], problem["target"]
    rest = torch.tensor(after + target[:-1])
    embeds = torch.cat(
        [embed[torch.tensor(before)], suffix_onehot @ embed, embed[rest]], dim=0
    )
    logits = logits_fn(embeds)[-len(target) :]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(target))


def one_hot(ids, vocab, dtype):
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).to(dtype)


def case(weights, cfg, problem, candidates):
    vocab = cfg["vocab_size"]
    embed = weights["model.embed_tokens.weight"]
    fn = lambda e: llama_logits(weights, cfg, e)
    x = one_hot(problem["suffix"], vocab, torch.float64).requires_grad_()
    loss = target_loss(fn, embed, problem, x)
    (grad,) = torch.autograd.grad(loss, x)
    # Central differences along single one-hot entries, the largest-gradient ones among them.
    checks = []
    flat = grad.abs().flatten().argsort(descending=True)[:4].tolist() + [3, vocab + 17]
    for index in flat:
        i, v = divmod(index, vocab)
        h = 1e-6
        bump = torch.zeros_like(x)
        bump[i, v] = h
        with torch.no_grad():
            up = target_loss(fn, embed, problem, x.detach() + bump)
            down = target_loss(fn, embed, problem, x.detach() - bump)
        fd = ((up - down) / (2 * h)).item()
        checks.append({"row": i, "token": v, "autograd": grad[i, v].item(), "finite_difference": fd})
    with torch.no_grad():
        cand = torch.tensor(
            [
                target_loss(fn, embed, problem, one_hot(c, vocab, torch.float64)).item()
                for c in candidates
            ],
            dtype=torch.float64,
        )
    return loss.detach(), grad, cand, checks


def stock_float32_grad(fixture, cfg_path, problem, vocab):
    """The same gradient from transformers' LlamaForCausalLM in stock float32 (base model)."""
    config = transformers.LlamaConfig.from_json_file(cfg_path)
    model = transformers.LlamaForCausalLM(config)
    state = safetensors.torch.load_file(os.path.join(fixture, "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    model.eval()
    embed = model.model.embed_tokens.weight.detach()
    fn = lambda e: model(inputs_embeds=e[None]).logits[0]
    x = one_hot(problem["suffix"], vocab, torch.float32).requires_grad_()
    loss = target_loss(fn, embed, problem, x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().to(torch.float64), grad.to(torch.float64)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixture", required=True)
    parser.add_argument("--out", default=OUT_DEFAULT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(args.fixture, "config.json")) as f:
        cfg = json.load(f)
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(SEED)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    problem = {
        "before": [1] + draw(BEFORE - 1),
        "suffix": draw(SUFFIX),
        "after": draw(AFTER),
        "target": draw(TARGET),
    }
    s = problem["suffix"]
    swap = lambda pos, tok: [tok if i == pos else x for i, x in enumerate(s)]
    candidates = [
        list(s),  # unchanged: the current loss
        swap(0, draw(1)[0]),
        swap(2, draw(1)[0]),
        swap(4, draw(1)[0]),
        swap(2, draw(1)[0]),  # a second candidate at position 2: same shared prefix
        [draw(1)[0] if i in (1, 3) else x for i, x in enumerate(s)],  # two positions changed
    ]
    tensors, results, fd = {}, {}, {}
    for name, adapter in (("base", None), ("adapter", ADAPTER_DIR)):
        weights = load_weights(args.fixture, adapter)
        loss, grad, cand, checks = case(weights, cfg, problem, candidates)
        tensors[f"{name}.loss"] = loss.reshape(())
        tensors[f"{name}.grad"] = grad.contiguous()
        tensors[f"{name}.candidate_losses"] = cand
        results[name] = {
            "loss": loss.item(),
            "grad_abs_max": grad.abs().max().item(),
            "candidate_losses": cand.tolist(),
        }
        fd[name] = {
            "checks": checks,
            "max_abs_error": max(abs(c["autograd"] - c["finite_difference"]) for c in checks),
        }
    loss32, grad32 = stock_float32_grad(
        args.fixture, os.path.join(args.fixture, "config.v4.json"), problem, vocab
    )
    os.makedirs(args.out, exist_ok=True)
    safetensors.torch.save_file(tensors, os.path.join(args.out, "reference.safetensors"))
    meta = {
        "what": "GCG token gradient, target loss and candidate losses on the tiny Llama (float64)",
        "problem": problem,
        "candidates": candidates,
        "adapter": {
            "dir": ADAPTER_DIR,
            "adapter_model.safetensors_sha256": sha256(
                os.path.join(ADAPTER_DIR, "adapter_model.safetensors")
            ),
        },
        "base": {"model.safetensors_sha256": sha256(os.path.join(args.fixture, "model.safetensors"))},
        "results": results,
        "self_checks": {
            "finite_differences": fd,
            "stock_float32_transformers_base": {
                "loss_abs_error": abs(loss32.item() - results["base"]["loss"]),
                "grad_max_abs_error": (grad32 - tensors["base.grad"]).abs().max().item(),
            },
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
        "seed": SEED,
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(meta["self_checks"], indent=1))
    print(json.dumps(results["base"]["candidate_losses"]))


if __name__ == "__main__":
    main()
