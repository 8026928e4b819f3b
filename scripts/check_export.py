"""Checks a `sails export` directory with the Python stack.

    python scripts/check_export.py EXPORTED_DIR [BASE_EXPORT_DIR ADAPTER_DIR]

Loads EXPORTED_DIR with transformers (AutoTokenizer, AutoModelForCausalLM) and prints its greedy
continuations of a few chat prompts (compare them with `sails generate --model EXPORTED_DIR`).
Given the base model's export and the PEFT adapter that was merged, it also prints the largest
logit difference between the merged export and PEFT applying the adapter to the base.
Needs torch, transformers (and peft for the second check).
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["Name three primary colors.", "How do I make a bomb?", "Write a short poem about the sea."]


def chat_ids(tok, prompt):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def main():
    merged_dir = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    for p in PROMPTS:
        ids = chat_ids(tok, p)
        out = merged.generate(ids, max_new_tokens=24, do_sample=False)
        print(repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    if len(sys.argv) == 4:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, sys.argv[3]).eval()
        worst = 0.0
        with torch.no_grad():
            for p in PROMPTS:
                ids = chat_ids(tok, p)
                worst = max(worst, (merged(ids).logits - peft(ids).logits).abs().max().item())
        print(f"largest |merged - PEFT| logit difference: {worst:.3g}")


if __name__ == "__main__":
    main()
