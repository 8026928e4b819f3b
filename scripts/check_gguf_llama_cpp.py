"""Reads a GGUF with llama.cpp (llama-cpp-python) and compares its greedy chat replies with
`sails generate --json`'s for the same prompts.

    sails generate --model MODEL.gguf -p "…" -p "…" --max-new-tokens 24 --json > sails.jsonl
    python scripts/check_gguf_llama_cpp.py MODEL.gguf sails.jsonl

Greedy means no repeat penalty and top-k 1 here (llama-cpp-python's chat defaults would change
the text). Exits 1 when any reply differs.
"""

import json
import sys

from llama_cpp import Llama

gguf, expected_file = sys.argv[1], sys.argv[2]
expected = [json.loads(line) for line in open(expected_file) if line.strip()]
llm = Llama(model_path=gguf, n_ctx=2048, n_threads=2, verbose=False)
differ = 0
for record in expected:
    max_tokens = record["new_tokens"]
    reply = llm.create_chat_completion(
        messages=record["messages"], temperature=0, top_k=1, repeat_penalty=1.0,
        max_tokens=max_tokens,
    )["choices"][0]["message"]["content"]
    same = reply == record["response"]
    differ += not same
    print(json.dumps({"prompt": record["messages"][-1]["content"], "same": same,
                      "llama_cpp": reply, "sails": record["response"]}))
print(f"{len(expected) - differ} of {len(expected)} replies the same", file=sys.stderr)
sys.exit(1 if differ else 0)
