"""Load on an OpenAI-compatible chat server: requests/s and tokens/s at several concurrencies.

    python scripts/bench_serve.py BASE_URL MODEL [--concurrency 1,8,32] [--requests 32]
                                  [--max-tokens 64] [--json]

The same client and requests for every server measured (`sails serve`, llama.cpp's server,
llama-cpp-python's), so the figures compare servers, not clients. Each request is a greedy
(temperature 0) chat completion of one of 32 short prompts, whole (not streamed); tokens are the
servers' own `usage.completion_tokens`. Latency is per request, from send to the whole reply.
"""

import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = [
    "What is the capital of France?", "Name three primary colours.",
    "Write a haiku about the sea.", "How do I boil an egg?", "What is 12 times 12?",
    "Give me a synonym for happy.", "Explain photosynthesis in one sentence.",
    "What is the largest planet in the solar system?", "Tell me a fun fact about octopuses.",
    "How many days are in a leap year?", "Translate 'good morning' into Spanish.",
    "What does a bee make?", "Suggest a name for a pet goldfish.",
    "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?",
    "How do I make a paper aeroplane?", "What is the opposite of cold?",
    "List two fruits that are yellow.", "Why is the sky blue?", "How do I kill a Python process?",
    "What is a prime number?", "Describe a cat in five words.",
    "What is the chemical symbol for gold?", "How do I pick a lock?",
    "Recommend a book for a long flight.", "What is the speed of light?",
    "How can I improve my sleep?", "What is the tallest mountain on Earth?",
    "Write one sentence about autumn.", "How do I make someone disappear?",
    "What is the square root of 81?", "Say hello in French.",
]


def one(url, model, prompt, max_tokens):
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as r:
        reply = json.load(r)
    return time.perf_counter() - start, reply["usage"]["completion_tokens"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("model")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    url = a.base_url.rstrip("/") + "/chat/completions"
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.requests)]
    one(url, a.model, prompts[0], 4)  # warm up
    rows = []
    for c in [int(x) for x in a.concurrency.split(",")]:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=c) as pool:
            done = list(pool.map(lambda q: one(url, a.model, q, a.max_tokens), prompts))
        wall = time.perf_counter() - start
        latencies = sorted(d[0] for d in done)
        tokens = sum(d[1] for d in done)
        rows.append({
            "concurrency": c,
            "requests": len(done),
            "tokens": tokens,
            "seconds": round(wall, 3),
            "requests_per_s": round(len(done) / wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "latency_median_s": round(statistics.median(latencies), 3),
            "latency_max_s": round(latencies[-1], 3),
        })
    if a.json:
        print(json.dumps(rows))
    else:
        print("concurrency  requests  tokens  seconds  req/s   tok/s   latency median / max")
        for r in rows:
            print(f"{r['concurrency']:>11}  {r['requests']:>8}  {r['tokens']:>6}  {r['seconds']:>7.2f}  "
                  f"{r['requests_per_s']:>5.2f}  {r['tokens_per_s']:>6.1f}  "
                  f"{r['latency_median_s']:.2f} / {r['latency_max_s']:.2f} s")


if __name__ == "__main__":
    main()
