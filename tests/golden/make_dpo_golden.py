"""Generates tests/fixtures/golden/tiny-llama-dpo-step/: one step of the DPO term of
src/train/dpo.rs on the tiny Llama of the shared golden folder, computed with PyTorch,
transformers and PEFT in float64.

For pair i, with log pi(y) the summed log-probability of a response's target tokens (the
response and its end-of-turn token; never the prompt, never what follows the end-of-turn token)
and pi_ref the same model with its adapter switched off:

    m_i   = beta * [(log pi(c_i) - log pi_ref(c_i)) - (log pi(r_i) - log pi_ref(r_i))]
    l_i   = -log sigmoid(m_i)
    loss  = w * mean_i l_i            (w = the DPO weight; the SFT term is not part of it)

The reference log-probs are computed one pair per batch, as dpo::reference_logps does. The
policy log-probs and the gradients come from one left-padded batch holding every pair, chosen
and rejected side by side (rows 2i and 2i + 1), as dpo::PairBatch lays them out.

Exact versions used for the committed files: Python 3.11.7, torch 2.15.0 (PyPI build, run on
CPU, one thread), transformers 5.24.0, peft 0.21.2, safetensors 0.8.0, numpy 2.4.6.

    python3 -m venv /tmp/venv-golden
    /tmp/venv-golden/bin/pip install torch==2.15.0 transformers==5.24.0 peft==0.21.2 \
        safetensors==0.8.0 numpy==2.4.6
    /tmp/venv-golden/bin/python tests/golden/make_dpo_golden.py \
        --fixture ../shared/golden/tiny-llama

Run from the repository root. `--fixture` is the golden `tiny-llama` folder (config.json,
model.safetensors); its sha256 is recorded in meta.json. Rerunning on the same versions gives
byte-identical files.

Float64: `model.double()` alone is not float64 in transformers 5.24 (RMSNorm, the eager softmax
and the RoPE tables are computed in float32), so `patch_float64` replaces those three with
float64 versions. `manual_dpo_loss` recomputes everything with an independent float64 Llama on
the merged weights W + s*B@A (no transformers or PEFT code) as a check; finite differences
check the autograd gradients. The error stock float32 transformers + PEFT makes is recorded
too, as the scale of honest float32 error.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import tempfile

import numpy as np
import peft
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama

OUT_DEFAULT = "tests/fixtures/golden/tiny-llama-dpo-step"

# The DPO settings: beta is the project's default (TrainConfig::dpo_beta), w a weight != 1 so a
# dropped weight shows.
BETA = 0.1
WEIGHT = 0.5

# LoRA as the SFT golden (tiny-llama-train-step): r 4, alpha 8, all seven projections.
R = 4
ALPHA = 8
SCALING = ALPHA / R
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_SEED = 7000
INIT_SEED = 7001
# lora_A = A_STD * N(0,1) / sqrt(in_features), lora_B = B_STD * N(0,1). B is smaller than in the
# SFT golden (0.2) so that the policy stays close enough to the reference for every pair's
# sigmoid(-m) to lie well inside (0, 1) (margins 1.21, 0.16, -0.93): no pair is saturated, and the
# pairs' pulls beta*sigmoid(-m) differ, so a wrong per-pair coefficient shows.
A_STD = 0.5
B_STD = 0.08

PAIR_SEED = 7002
EOS = 2
PAD = 0
# (id, prompt length, chosen response length, rejected response length, tokens after the
# chosen response, tokens after the rejected response). Response lengths count the final
# end-of-turn token (EOS). A token after the response (ChatML writes "\n" after <|im_end|>) is
# part of the sequence but not a target.
PAIR_SHAPES = [
    ("p0", 5, 6, 4, 0, 1),
    ("p1", 3, 3, 7, 1, 0),
    ("p2", 6, 5, 5, 0, 0),
]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------
# float64 versions of the three ops transformers 5.24 computes in float32


def patch_float64():
    def rms_forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        cfg = self.config
        theta = cfg.rope_parameters["rope_theta"]
        dim = cfg.head_dim
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def eager_attention_forward(
        module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs
    ):
        key_states = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value_states = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = torch.softmax(attn_weights, dim=-1)
        attn_output = torch.matmul(attn_weights, value_states)
        return attn_output.transpose(1, 2).contiguous(), attn_weights

    modeling_llama.LlamaRMSNorm.forward = rms_forward
    modeling_llama.LlamaRotaryEmbedding.forward = rope_forward
    modeling_llama.eager_attention_forward = eager_attention_forward


# ---------------------------------------------------------------------------------------------
# data


def make_pairs():
    g = np.random.default_rng(PAIR_SEED)
    token = lambda n: [int(x) for x in g.integers(3, 512, size=n)]
    pairs = []
    for pid, lp, lc, lr, tc, tr in PAIR_SHAPES:
        prompt = token(lp)
        sides = {}
        for side, n, trail in (("chosen", lc, tc), ("rejected", lr, tr)):
            response = token(n - 1) + [EOS]
            ids = prompt + response + token(trail)
            sides[side] = {
                "ids": ids,
                "target_start": lp,
                "target_end": lp + n,
            }
        pairs.append({"id": pid, "prompt": prompt, **sides})
    return pairs


def left_padded(rows):
    """ids, mask, position_ids (cumsum(mask) - 1, pads 1) and the targets (row, pos, token)
    with pos the logit position that predicts the token, as Batch::left_padded."""
    width = max(len(r["ids"]) for r in rows)
    ids, mask, targets = [], [], []
    for row, r in enumerate(rows):
        pad = width - len(r["ids"])
        ids.append([PAD] * pad + r["ids"])
        mask.append([0] * pad + [1] * len(r["ids"]))
        for i in range(r["target_start"], r["target_end"]):
            targets.append((row, pad + i - 1, r["ids"][i]))
    ids = torch.tensor(ids, dtype=torch.int64)
    mask = torch.tensor(mask, dtype=torch.int64)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos, targets


def pair_rows(pairs):
    return [r for p in pairs for r in (p["chosen"], p["rejected"])]


def row_logps(logits, targets, n_rows):
    """Per row, the sum of log softmax(logits[row, pos])[token] over its targets; and the
    per-target log-probs in target order."""
    logp = torch.log_softmax(logits, dim=-1)
    per_target = torch.stack([logp[r, p, t] for r, p, t in targets])
    sums = [torch.zeros((), dtype=logits.dtype) for _ in range(n_rows)]
    for (r, _, _), v in zip(targets, per_target):
        sums[r] = sums[r] + v
    return torch.stack(sums), per_target


def dpo_from_logps(policy, reference, beta, weight, reduce="mean"):
    """policy, reference: (pairs, 2) [chosen, rejected]."""
    ratio = policy - reference
    margin = beta * (ratio[:, 0] - ratio[:, 1])
    losses = -F.logsigmoid(margin)
    total = losses.mean() if reduce == "mean" else losses.sum()
    return weight * total, margin, losses


# ---------------------------------------------------------------------------------------------
# models


def load_peft_model(fixture, dtype, adapter_values=None):
    """The tiny Llama (eager attention) with a LoRA on all seven projections. With
    `adapter_values` (PEFT key -> float32 tensor) the factors are set to them; otherwise they are
    drawn (see the module docstring) and returned."""
    model = LlamaForCausalLM.from_pretrained(
        fixture, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    cfg = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(PEFT_SEED)
    pm = get_peft_model(model, cfg)
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(lora) == 28, sorted(lora)
    if adapter_values is None:
        gen = torch.Generator().manual_seed(INIT_SEED)
        adapter_values = {}
        for name in sorted(lora):
            p = lora[name]
            x = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if ".lora_A." in name:
                x = A_STD * x / math.sqrt(p.shape[1])
            else:
                x = B_STD * x
            adapter_values[peft_key(name)] = x.to(torch.float32)
    with torch.no_grad():
        for name, p in lora.items():
            p.copy_(adapter_values[peft_key(name)])
    pm = pm.to(dtype)
    for name, p in pm.named_parameters():
        p.requires_grad_("lora_" in name)
    return pm, adapter_values


def peft_key(param_name):
    """PEFT's saved key of a LoRA parameter (the adapter name removed)."""
    return param_name.replace(".default", "")


def lora_params(pm):
    return {peft_key(n): p for n, p in pm.named_parameters() if "lora_" in n}


def forward_logits(pm, ids, mask, pos):
    return pm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def reference_logps(pm, pairs):
    """Adapter off, one pair per batch (as dpo::reference_logps)."""
    out = []
    with torch.no_grad(), pm.disable_adapter():
        for p in pairs:
            ids, mask, pos, targets = left_padded([p["chosen"], p["rejected"]])
            sums, _ = row_logps(forward_logits(pm, ids, mask, pos), targets, 2)
            out.append(sums)
    return torch.stack(out)


def dpo_step(pm, pairs, beta=BETA, weight=WEIGHT, reference=None):
    """Loss, gradients (PEFT key -> tensor) and the intermediate values."""
    if reference is None:
        reference = reference_logps(pm, pairs)
    params = lora_params(pm)
    for p in params.values():
        p.grad = None
    ids, mask, pos, targets = left_padded(pair_rows(pairs))
    logits = forward_logits(pm, ids, mask, pos)
    sums, per_target = row_logps(logits, targets, 2 * len(pairs))
    policy = sums.view(len(pairs), 2)
    loss, margin, losses = dpo_from_logps(policy, reference, beta, weight)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    return {
        "loss": loss.detach(),
        "margin": margin.detach(),
        "pair_loss": losses.detach(),
        "policy_logps": policy.detach(),
        "reference_logps": reference.detach(),
        "policy_target_logps": per_target.detach(),
        "logits": logits.detach(),
        "grads": grads,
        "batch": (ids, mask, pos, targets),
    }


# ---------------------------------------------------------------------------------------------
# an independent float64 Llama (no transformers / PEFT code) on merged weights


def manual_logits(weights, cfg, ids, mask, pos):
    eps = cfg.rms_norm_eps
    n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos.to(torch.float64)[..., None] * inv  # (b, t, hd/2)
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # (b, h, t, hd), rotate-half
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        c, s = cos[:, None], sin[:, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    b, t = ids.shape
    x = weights["model.embed_tokens.weight"][ids]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal[None] & (mask[:, None, :] == 1)  # (b, query, key)
    for layer in range(cfg.num_hidden_layers):
        w = lambda n: weights[f"model.layers.{layer}.{n}"]
        h = norm(x, w("input_layernorm.weight"))
        q = (h @ w("self_attn.q_proj.weight").T).view(b, t, n_h, hd).transpose(1, 2)
        k = (h @ w("self_attn.k_proj.weight").T).view(b, t, n_kv, hd).transpose(1, 2)
        v = (h @ w("self_attn.v_proj.weight").T).view(b, t, n_kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        group = n_h // n_kv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], -1e300)
        ctx = torch.softmax(scores, dim=-1) @ v
        ctx = ctx.transpose(1, 2).reshape(b, t, n_h * hd)
        x = x + ctx @ w("self_attn.o_proj.weight").T
        h = norm(x, w("post_attention_layernorm.weight"))
        gate = h @ w("mlp.gate_proj.weight").T
        up = h @ w("mlp.up_proj.weight").T
        x = x + (gate * torch.sigmoid(gate) * up) @ w("mlp.down_proj.weight").T
    x = norm(x, weights["model.norm.weight"])
    return x @ weights["model.embed_tokens.weight"].T


def manual_dpo(fixture, cfg, adapter_values, pairs, beta=BETA, weight=WEIGHT):
    base = {
        k: v.to(torch.float64)
        for k, v in safetensors.torch.load_file(os.path.join(fixture, "model.safetensors")).items()
    }
    factors = {
        k: v.to(torch.float64).clone().requires_grad_(True) for k, v in adapter_values.items()
    }

    def merged(with_adapter):
        w = dict(base)
        if with_adapter:
            prefix = "base_model.model."
            for k in factors:
                if k.endswith(".lora_A.weight"):
                    module = k[len(prefix) : -len(".lora_A.weight")]
                    a = factors[k]
                    bb = factors[k.replace(".lora_A.", ".lora_B.")]
                    w[module + ".weight"] = base[module + ".weight"] + SCALING * bb @ a
        return w

    with torch.no_grad():
        ref = []
        wb = merged(False)
        for p in pairs:
            ids, mask, pos, targets = left_padded([p["chosen"], p["rejected"]])
            ref.append(row_logps(manual_logits(wb, cfg, ids, mask, pos), targets, 2)[0])
        ref = torch.stack(ref)
    ids, mask, pos, targets = left_padded(pair_rows(pairs))
    sums, _ = row_logps(manual_logits(merged(True), cfg, ids, mask, pos), targets, len(ids))
    policy = sums.view(len(pairs), 2)
    loss, margin, _ = dpo_from_logps(policy, ref, beta, weight)
    loss.backward()
    return loss.detach(), policy.detach(), ref, {k: f.grad for k, f in factors.items()}


# ---------------------------------------------------------------------------------------------


def max_abs(a, b):
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def grads_max_abs(ga, gb):
    return max(max_abs(ga[k], gb[k]) for k in ga)


def loss_only(pm, pairs, reference):
    with torch.no_grad():
        ids, mask, pos, targets = left_padded(pair_rows(pairs))
        sums, _ = row_logps(forward_logits(pm, ids, mask, pos), targets, 2 * len(pairs))
        return float(dpo_from_logps(sums.view(len(pairs), 2), reference, BETA, WEIGHT)[0])


def finite_differences(pm, pairs, reference, grads):
    """4-point central differences on the transformers + PEFT float64 loss, no autograd: the
    largest-magnitude entry and one random entry of every LoRA tensor, and random directions."""
    h = 1e-4
    params = lora_params(pm)
    gen = np.random.default_rng(7003)
    entries = []
    for key in sorted(params):
        p, g = params[key], grads[key]
        flat_largest = int(g.abs().argmax())
        flat_random = int(gen.integers(0, g.numel()))
        for flat in (flat_largest, flat_random):
            idx = np.unravel_index(flat, tuple(g.shape))
            orig = float(p.data[idx])
            vals = []
            for step in (2 * h, h, -h, -2 * h):
                p.data[idx] = orig + step
                vals.append(loss_only(pm, pairs, reference))
            p.data[idx] = orig
            fd = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)
            entries.append(
                {
                    "tensor": key,
                    "index": [int(i) for i in idx],
                    "autograd": float(g[idx]),
                    "finite_difference": fd,
                    "abs_diff": abs(fd - float(g[idx])),
                }
            )
    directions = []
    keys = sorted(params)
    for _ in range(3):
        d = {k: torch.tensor(gen.standard_normal(tuple(params[k].shape))) for k in keys}
        n = math.sqrt(sum(float((v * v).sum()) for v in d.values()))
        d = {k: v / n for k, v in d.items()}
        orig = {k: params[k].data.clone() for k in keys}
        vals = []
        for step in (2 * h, h, -h, -2 * h):
            for k in keys:
                params[k].data.copy_(orig[k] + step * d[k])
            vals.append(loss_only(pm, pairs, reference))
        for k in keys:
            params[k].data.copy_(orig[k])
        fd = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)
        ad = sum(float((grads[k] * d[k]).sum()) for k in keys)
        directions.append({"autograd_dot_direction": ad, "finite_difference": fd,
                           "abs_diff": abs(ad - fd)})
    return entries, directions


def mistakes(pm, pairs, ref64, out):
    """What each wrong convention changes, float64: |loss change| and max |gradient change|."""
    res = {}

    def record(name, loss, grads):
        res[name] = {"loss": abs(float(loss) - float(out["loss"])),
                     "grads_max_abs": grads_max_abs(grads, out["grads"])}

    for name, kw in (
        ("beta 0.2 instead of 0.1", {"beta": 0.2}),
        ("beta 0.11 instead of 0.1", {"beta": 0.11}),
        ("no DPO weight (w = 1)", {"weight": 1.0}),
    ):
        o = dpo_step(pm, pairs, reference=ref64, **kw)
        record(name, o["loss"], o["grads"])

    # Variants of the log-prob: each recomputes policy and reference the same wrong way.
    def variant(transform_rows, normalise=False):
        ps = [
            {**p, "chosen": transform_rows(p["chosen"]), "rejected": transform_rows(p["rejected"])}
            for p in pairs
        ]
        if not normalise:
            o = dpo_step(pm, ps)
            return o["loss"], o["grads"]
        # mean instead of sum over a response's targets
        counts = torch.tensor(
            [[p[s]["target_end"] - p[s]["target_start"] for s in ("chosen", "rejected")]
             for p in ps], dtype=torch.float64)
        ref = reference_logps(pm, ps) / counts
        params = lora_params(pm)
        for p in params.values():
            p.grad = None
        ids, mask, pos, targets = left_padded(pair_rows(ps))
        sums, _ = row_logps(forward_logits(pm, ids, mask, pos), targets, 2 * len(ps))
        loss, _, _ = dpo_from_logps(sums.view(len(ps), 2) / counts, ref, BETA, WEIGHT)
        loss.backward()
        return loss.detach(), {k: p.grad.detach().clone() for k, p in params.items()}

    record("log-probs averaged over the response instead of summed",
           *variant(lambda r: r, normalise=True))
    # Cancels exactly: a pair's two sides share the prompt, so its log-probs are equal on both
    # sides under the policy and under the reference. The SFT golden sees this mistake.
    record("prompt tokens scored too (targets 1..target_end)",
           *variant(lambda r: {**r, "target_start": 1}))
    record("first response token left out (targets target_start+1..target_end)",
           *variant(lambda r: {**r, "target_start": r["target_start"] + 1}))
    record("tokens after the end-of-turn token scored too",
           *variant(lambda r: {**r, "target_end": len(r["ids"])}))
    # Sum over pairs instead of the mean.
    params = lora_params(pm)
    for p in params.values():
        p.grad = None
    ids, mask, pos, targets = left_padded(pair_rows(pairs))
    sums, _ = row_logps(forward_logits(pm, ids, mask, pos), targets, 2 * len(pairs))
    loss, _, _ = dpo_from_logps(sums.view(len(pairs), 2), ref64, BETA, WEIGHT, reduce="sum")
    loss.backward()
    record("sum over pairs instead of the mean", loss.detach(),
           {k: p.grad.detach().clone() for k, p in params.items()})
    # Chosen and rejected swapped.
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    o = dpo_step(pm, swapped)
    record("chosen and rejected swapped", o["loss"], o["grads"])
    # The reference computed with the adapter on: the policy is its own reference, m = 0.
    with torch.no_grad():
        own = []
        for p in pairs:
            i2, m2, p2, t2 = left_padded([p["chosen"], p["rejected"]])
            own.append(row_logps(forward_logits(pm, i2, m2, p2), t2, 2)[0])
    o = dpo_step(pm, pairs, reference=torch.stack(own))
    record("reference = the policy (adapter not switched off)", o["loss"], o["grads"])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", required=True, help="the golden tiny-llama folder")
    ap.add_argument("--out", default=OUT_DEFAULT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    fixture = args.fixture
    os.makedirs(args.out, exist_ok=True)

    pairs = make_pairs()

    # Stock float32 transformers + PEFT first (before patching): the scale of honest f32 error.
    pm32, adapter = load_peft_model(fixture, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        pm32.save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            adapter_config = json.load(f)
        saved = safetensors.torch.load_file(os.path.join(tmp, "adapter_model.safetensors"))
    assert sorted(saved) == sorted(adapter), "save_pretrained keys differ"
    for k in saved:
        assert torch.equal(saved[k], adapter[k]), k
    out32 = dpo_step(pm32, pairs)

    patch_float64()
    pm, _ = load_peft_model(fixture, torch.float64, adapter)
    cfg = pm.base_model.model.config
    out = dpo_step(pm, pairs)
    ref64 = out["reference_logps"]

    # Self-checks.
    checks = {}
    # The reference from the whole six-row batch (adapter off) equals the one-pair batches.
    with torch.no_grad(), pm.disable_adapter():
        ids, mask, pos, targets = out["batch"]
        whole, _ = row_logps(forward_logits(pm, ids, mask, pos), targets, len(ids))
    checks["reference_logps_whole_batch_vs_one_pair_per_batch"] = max_abs(
        whole.view(-1, 2), ref64
    )
    # Each pair alone without pads vs the policy log-probs from the padded batch.
    alone = []
    with torch.no_grad():
        for p in pairs:
            for side in ("chosen", "rejected"):
                i1, m1, p1, t1 = left_padded([p[side]])
                alone.append(row_logps(forward_logits(pm, i1, m1, p1), t1, 1)[0][0])
    checks["policy_logps_each_sequence_alone_vs_padded_batch"] = max_abs(
        torch.stack(alone).view(-1, 2), out["policy_logps"]
    )
    # The independent float64 implementation.
    m_loss, m_policy, m_ref, m_grads = manual_dpo(fixture, cfg, adapter, pairs)
    checks["independent_float64_forward_autograd_vs_reference"] = {
        "loss": max_abs(m_loss, out["loss"]),
        "policy_logps": max_abs(m_policy, out["policy_logps"]),
        "reference_logps": max_abs(m_ref, ref64),
        "lora_grads_max_abs": grads_max_abs(m_grads, out["grads"]),
    }
    entries, directions = finite_differences(pm, pairs, ref64, out["grads"])
    checks["finite_differences_float64"] = {
        "stencil": "(-f(2h) + 8f(h) - 8f(-h) + f(-2h)) / 12h, h = 1e-4, on the transformers + "
        "PEFT float64 loss (reference log-probs held fixed, as in training)",
        "n_single_entries": len(entries),
        "max_abs_diff_single_entries": max(e["abs_diff"] for e in entries),
        "max_rel_diff_single_entries": max(
            e["abs_diff"] / max(abs(e["autograd"]), 1e-300) for e in entries
        ),
        "directional_derivatives_random_unit_directions": directions,
        "lora_entries": entries,
    }
    # The DPO pull β·σ(−m) is in (0, β): no pair saturated.
    pull = BETA * torch.sigmoid(-out["margin"])
    f32_err = {
        "loss": max_abs(out32["loss"], out["loss"]),
        "reference_logps": max_abs(out32["reference_logps"], ref64),
        "policy_logps": max_abs(out32["policy_logps"], out["policy_logps"]),
        "margin": max_abs(out32["margin"], out["margin"]),
        "lora_grads_max_abs": grads_max_abs(out32["grads"], out["grads"]),
        "lora_grads_max_rel_to_tensor_abs_max": max(
            max_abs(out32["grads"][k], out["grads"][k]) / float(out["grads"][k].abs().max())
            for k in out["grads"]
        ),
    }
    wrong = mistakes(pm, pairs, ref64, out)

    # ----- write
    ids, mask, pos, targets = out["batch"]
    rows = pair_rows(pairs)
    spans = []
    for row, r in enumerate(rows):
        pad = ids.shape[1] - len(r["ids"])
        spans.append([pad + r["target_start"], pad + r["target_end"]])
    safetensors.torch.save_file(
        {
            "input_ids": ids.contiguous(),
            "attention_mask": mask.contiguous(),
            "position_ids": pos.contiguous(),
            "target_spans": torch.tensor(spans, dtype=torch.int64),
        },
        os.path.join(args.out, "inputs.safetensors"),
        metadata={"format": "pt"},
    )
    # Informational only: the base is the shared golden tiny-llama folder (README.md).
    adapter_config["base_model_name_or_path"] = "tiny-llama"
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
        f.write("\n")
    safetensors.torch.save_file(
        {k: adapter[k].contiguous() for k in sorted(adapter)},
        os.path.join(args.out, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    reference = {
        "loss": out["loss"].reshape(()),
        "margin": out["margin"],
        "pair_loss": out["pair_loss"],
        "policy_logps": out["policy_logps"],
        "reference_logps": ref64,
        "policy_target_logps": out["policy_target_logps"],
    }
    for k, g in out["grads"].items():
        reference[f"{k}.grad"] = g
    safetensors.torch.save_file(
        {k: v.to(torch.float64).contiguous() for k, v in sorted(reference.items())},
        os.path.join(args.out, "reference.safetensors"),
        metadata={"format": "pt"},
    )
    grads_abs = torch.cat([g.abs().flatten() for g in out["grads"].values()])
    meta = {
        "base": {
            "folder": "the shared golden tiny-llama (config.json, model.safetensors)",
            "model.safetensors_sha256": sha256(os.path.join(fixture, "model.safetensors")),
            "config.json_sha256": sha256(os.path.join(fixture, "config.json")),
        },
        "lora": {
            "r": R, "lora_alpha": ALPHA, "scaling": SCALING, "target_modules": TARGETS,
            "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
        },
        "init": f"get_peft_model under torch.manual_seed({PEFT_SEED}), then in sorted parameter-"
        f"name order from torch.Generator seed {INIT_SEED} (float64 draws rounded to float32): "
        f"lora_A = {A_STD} * N(0,1) / sqrt(in_features), lora_B = {B_STD} * N(0,1)",
        "dpo": {
            "beta": BETA,
            "weight": WEIGHT,
            "loss": "weight * mean_i -log sigmoid(m_i), m_i = beta * ((log pi(c_i) - log "
            "pi_ref(c_i)) - (log pi(r_i) - log pi_ref(r_i))); log pi(y) = sum of log "
            "softmax(logits[row, pos])[token] over y's targets",
            "reference": "the same model with the adapter disabled (PeftModel.disable_adapter), "
            "one pair per batch",
            "policy": "one left-padded batch, rows [c0, r0, c1, r1, c2, r2]",
        },
        "pairs": pairs,
        "target_spans_in_padded_batch_[start,end)": spans,
        "reference_dtype": "float64 compute (model.double() + patch_float64), stored as float64",
        "results": {
            "loss": float(out["loss"]),
            "mean_pair_loss": float(out["pair_loss"].mean()),
            "margins": [float(x) for x in out["margin"]],
            "pair_losses": [float(x) for x in out["pair_loss"]],
            "pull_beta_sigmoid_minus_margin": [float(x) for x in pull],
            "policy_logps": out["policy_logps"].tolist(),
            "reference_logps": ref64.tolist(),
            "lora_grad_abs_max": float(grads_abs.max()),
            "lora_grad_abs_min": float(grads_abs.min()),
            "n_lora_grad_entries_below_1e-6": int((grads_abs < 1e-6).sum()),
            "logits_abs_max_real_tokens": float(out["logits"][mask == 1].abs().max()),
        },
        "checks": checks,
        "transformers_peft_torch_float32_vs_reference": f32_err,
        "max_abs_change_if_an_implementation_makes_this_mistake": wrong,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(json.dumps({k: meta[k] for k in ("results", "transformers_peft_torch_float32_vs_reference",
                                           "max_abs_change_if_an_implementation_makes_this_mistake")},
                     indent=1))
    print(json.dumps({k: v for k, v in checks.items() if k != "finite_differences_float64"},
                     indent=1))
    fd = checks["finite_differences_float64"]
    print("finite differences:", fd["max_abs_diff_single_entries"], fd["max_rel_diff_single_entries"],
          [d["abs_diff"] for d in fd["directional_derivatives_random_unit_directions"]])


if __name__ == "__main__":
    main()
