"""Shared helpers for the peer (Python stack) re-measurement scripts.

Method: SmolLM2-135M-Instruct loaded from the Q4_1 GGUF through transformers (dequantised to
f32), attention "sdpa", no torch.compile, torch.set_num_threads(2). The model and data files
are the ones `sails assets fetch` puts in $SAILS_HOME/assets.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import platform
import resource
import statistics
import sys
import time

import torch

def _sails_home():
    if os.environ.get("SAILS_HOME"):
        return os.environ["SAILS_HOME"]
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "sails")
    return os.path.join(os.path.expanduser("~"), ".cache", "sails")


ASSETS = os.environ.get("PEER_ASSETS", os.path.join(_sails_home(), "assets"))
GGUF_DIR = os.path.join(ASSETS, "smollm2-135m-instruct-q4_1")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA = os.path.join(ASSETS, "alpaca-gpt4-demo", "alpaca_en_demo.json")
JBB_CSV = os.path.join(ASSETS, "jbb-behaviors", "behaviors.csv")
XSTEST_CSV = os.path.join(ASSETS, "xstest", "xstest_prompts.csv")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def setup_threads(n):
    torch.set_num_threads(n)
    return torch.get_num_threads()


def load_tokenizer(padding_side="right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model():
    from transformers import AutoModelForCausalLM

    import transformers

    # transformers 5 names the precision `dtype`; 4.x (nanoGCG's pin) names it `torch_dtype`.
    major = int(transformers.__version__.split(".")[0])
    precision = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        GGUF_DIR, gguf_file=GGUF_FILE, attn_implementation="sdpa", **precision
    )
    load_s = time.perf_counter() - t0
    return model, load_s


def chat_prompt(tok, user_msg):
    """Chat template with the template's default system prompt around one user message."""
    return tok.apply_chat_template(
        [{"role": "user", "content": user_msg}], add_generation_prompt=True, tokenize=False
    )


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
        fam = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("cpu family")), "?")
        mod = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model\t")), "?")
        flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
        simd = sorted(f for f in flags if f.startswith("avx512") or f in ("avx2", "amx_bf16", "amx_tile"))
        return {"model_name": name, "family": fam, "model": mod, "simd_flags": simd,
                "logical_cpus": os.cpu_count()}
    except OSError:
        return {"model_name": platform.processor()}


def peak_rss_gib():
    # Linux: ru_maxrss is in KiB; whole-process peak, model loading included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2)


def current_rss_gib():
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1024 ** 3)
    except Exception:
        return None


def env_info():
    import transformers

    try:
        import peft

        peft_v = peft.__version__
    except Exception:
        peft_v = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_v,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "loadavg_at_end": os.getloadavg(),
    }


def median(xs):
    return statistics.median(xs) if xs else None


def emit(result):
    result["peak_rss_gib"] = round(peak_rss_gib(), 3)
    result["rss_at_end_gib"] = None if current_rss_gib() is None else round(current_rss_gib(), 3)
    result["env"] = env_info()
    line = json.dumps(result)
    print(line, flush=True)
    return line
