"""Talks to `sails serve` with the official `openai` client, as a user's program would.

    python scripts/openai_client_check.py BASE_URL PROMPTS.jsonl MAX_TOKENS

Prints one JSON object: the listed models, every prompt's greedy reply asked all at once
(`concurrent`), the first eight streamed at once (`streamed`), and the error the client raises
for a request over the server's limits (`error`).
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI

base_url, prompts_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
prompts = [json.loads(line)["prompt"] for line in open(prompts_file) if line.strip()]


def ask(prompt, **extra):
    options = {"temperature": 0, "max_tokens": max_tokens, **extra}
    return client.chat.completions.create(
        model="sails", messages=[{"role": "user", "content": prompt}], **options
    )


def whole(prompt):
    reply = ask(prompt)
    choice = reply.choices[0]
    return {
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "completion_tokens": reply.usage.completion_tokens,
    }


def streamed(prompt):
    text, finish, usage = "", None, None
    for chunk in ask(prompt, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            choice = chunk.choices[0]
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return {"content": text, "finish_reason": finish, "completion_tokens": usage}


with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
    concurrent = list(pool.map(whole, prompts))
    streams = list(pool.map(streamed, prompts[:8]))

try:
    ask(prompts[0], max_tokens=10**6)
    error = None
except openai.BadRequestError as e:
    error = {"status": e.status_code, "message": str(e)}

print(
    json.dumps(
        {
            "openai": openai.__version__,
            "models": [m.id for m in client.models.list()],
            "concurrent": concurrent,
            "streamed": streams,
            "error": error,
        }
    )
)
