#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/ (standard library only).

Each seed is a small valid file of the kind the target parses (a tiny llama GGUF with a
byte-level tokenizer and a chat template, safetensors files for each loader, a Gemma Scope
params.npz, configs, templates, JSONL lines); the fuzzers start from them and keep what they
find in fuzz/corpus/<target>/.

    python3 fuzz/make_seeds.py
"""

import io
import json
import os
import struct
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- GGUF

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


def gstr(s, v=3):
    b = s.encode()
    return (struct.pack("<I", len(b)) if v == 1 else struct.pack("<Q", len(b))) + b


def gval(t, val, v=3):
    if t == STRING:
        return gstr(val, v)
    if t == ARRAY:
        et, items = val
        n = struct.pack("<I", len(items)) if v == 1 else struct.pack("<Q", len(items))
        return struct.pack("<I", et) + n + b"".join(gval(et, x, v) for x in items)
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
           BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}[t]
    return struct.pack(fmt, val)


def f16(x):
    return struct.pack("<e", x)


def q8_0(n):
    # blocks of 32: f16 scale + 32 int8
    return b"".join(f16(0.01) + bytes((i * 7 + j) % 256 for j in range(32)) for i in range(n // 32))


def q4_0(n):
    return b"".join(f16(0.02) + bytes((i + j) % 256 for j in range(16)) for i in range(n // 32))


def q4_1(n):
    return b"".join(f16(0.02) + f16(-0.1) + bytes((i * 3 + j) % 256 for j in range(16))
                    for i in range(n // 32))


def f32s(n):
    return b"".join(struct.pack("<f", 1.0 + 0.001 * i) for i in range(n))


def f16s(n):
    return b"".join(f16(0.5 - 0.001 * i) for i in range(n))


GGML = {"F32": (0, f32s), "F16": (1, f16s), "Q4_0": (2, q4_0), "Q4_1": (3, q4_1),
        "Q8_0": (8, q8_0)}


def gguf(metadata, tensors, version=3, alignment=32):
    """metadata: [(key, type, value)]; tensors: [(name, [rows, cols] or [n], ggml name)]."""
    head = b"GGUF" + struct.pack("<I", version)
    cnt = (lambda n: struct.pack("<I", n)) if version == 1 else (lambda n: struct.pack("<Q", n))
    head += cnt(len(tensors)) + cnt(len(metadata))
    for k, t, val in metadata:
        head += gstr(k, version) + struct.pack("<I", t) + gval(t, val, version)
    data = b""
    for name, shape, ty in tensors:
        tid, make = GGML[ty]
        n = 1
        for d in shape:
            n *= d
        blob = make(n)
        while len(data) % alignment:
            data += b"\0"
        ne = list(reversed(shape))
        dims = b"".join(struct.pack("<I" if version == 1 else "<Q", d) for d in ne)
        head += gstr(name, version) + struct.pack("<I", len(ne)) + dims
        head += struct.pack("<I", tid) + struct.pack("<Q", len(data))
        data += blob
    while len(head) % alignment:
        head += b"\0"
    return head + data


def byte_chars():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out = [None] * 256
    for b in keep:
        out[b] = chr(b)
    n = 0
    for b in range(256):
        if out[b] is None:
            out[b] = chr(256 + n)
            n += 1
    return out


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama_gguf(arch="llama", tokenizer=True, version=3, hidden=32, ffn=32, kinds=None):
    heads, kv = 2, 1
    hd = hidden // heads
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars() + ["He", "ll", "llo"]
    vocab = len(tokens) if tokenizer else 8
    k = kinds or {}
    md = [
        ("general.architecture", STRING, arch),
        ("general.name", STRING, "tiny"),
        (f"{arch}.embedding_length", U32, hidden),
        (f"{arch}.feed_forward_length", U32, ffn),
        (f"{arch}.block_count", U32, 1),
        (f"{arch}.attention.head_count", U32, heads),
        (f"{arch}.attention.head_count_kv", U32, kv),
        (f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-5),
        (f"{arch}.context_length", U32, 64),
        (f"{arch}.rope.freq_base", F32, 10000.0),
        ("general.alignment", U32, 32),
    ]
    if tokenizer:
        md += [
            ("tokenizer.ggml.model", STRING, "gpt2"),
            ("tokenizer.ggml.pre", STRING, "smollm"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
            ("tokenizer.ggml.token_type", ARRAY, (I32, [3, 3, 3] + [1] * (len(tokens) - 3))),
            ("tokenizer.ggml.merges", ARRAY, (STRING, ["H e", "l l", "ll o"])),
            ("tokenizer.ggml.bos_token_id", U32, 1),
            ("tokenizer.ggml.eos_token_id", U32, 2),
            ("tokenizer.ggml.padding_token_id", U32, 0),
            ("tokenizer.ggml.add_bos_token", BOOL, False),
            ("tokenizer.chat_template", STRING, SMOLLM2_TEMPLATE),
        ]
    t = [
        ("token_embd.weight", [vocab, hidden], k.get("embd", "Q8_0")),
        ("output_norm.weight", [hidden], "F32"),
        ("blk.0.attn_norm.weight", [hidden], "F32"),
        ("blk.0.ffn_norm.weight", [hidden], "F32"),
        ("blk.0.attn_q.weight", [heads * hd, hidden], k.get("q", "Q8_0")),
        ("blk.0.attn_k.weight", [kv * hd, hidden], k.get("k", "Q4_1")),
        ("blk.0.attn_v.weight", [kv * hd, hidden], k.get("v", "F16")),
        ("blk.0.attn_output.weight", [hidden, heads * hd], k.get("o", "Q4_0")),
        ("blk.0.ffn_gate.weight", [ffn, hidden], "Q8_0"),
        ("blk.0.ffn_up.weight", [ffn, hidden], "Q4_1"),
        ("blk.0.ffn_down.weight", [hidden, ffn], "F32"),
    ]
    if arch == "qwen2":
        t += [("blk.0.attn_q.bias", [heads * hd], "F32"), ("blk.0.attn_k.bias", [kv * hd], "F32"),
              ("blk.0.attn_v.bias", [kv * hd], "F32")]
    return gguf(md, t, version=version)


def seeds_gguf():
    put("gguf", "llama-bytelevel.gguf", llama_gguf())
    put("gguf", "llama-no-tokenizer.gguf", llama_gguf(tokenizer=False))
    put("gguf", "qwen2-no-tokenizer.gguf", llama_gguf("qwen2", tokenizer=False))
    put("gguf", "llama-v2-f32.gguf",
        llama_gguf(tokenizer=False, version=2, kinds={"embd": "F32", "q": "F16", "k": "F32"}))
    # SentencePiece-style vocabulary, header only.
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "h", "\u2581h"]
    md = [
        ("general.architecture", STRING, "llama"),
        ("tokenizer.ggml.model", STRING, "llama"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, toks)),
        ("tokenizer.ggml.scores", ARRAY, (F32, [0.0] * (len(toks) - 3) + [-1.0, -2.0, -3.0])),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [2, 3, 3] + [6] * 256 + [1, 1, 1])),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.add_space_prefix", BOOL, True),
        ("tokenizer.chat_template", STRING, LLAMA2_TEMPLATE),
    ]
    put("gguf", "sentencepiece-header.gguf", gguf(md, [("output_norm.weight", [32], "F32")]))
    put("gguf", "v1-header.gguf", gguf(md[:1], [("output_norm.weight", [32], "F16")], version=1))


# ---------------------------------------------------------------- safetensors

def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape)]"""
    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U8": 1, "I64": 8}
    header, data = {}, b""
    for name, dt, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        blob = bytes((i * 37 + 11) % 251 for i in range(n * size[dt]))
        if dt == "F32":
            blob = b"".join(struct.pack("<f", 0.01 * (i % 17) - 0.05) for i in range(n))
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def seeds_safetensors():
    put("safetensors", "model.safetensors",
        safetensors([("model.embed_tokens.weight", "F32", [4, 4])], {"format": "pt"}))
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    put("safetensors", "adapter.safetensors",
        safetensors([(pre + ".lora_A.weight", "F32", [4, 4]), (pre + ".lora_B.weight", "F32", [4, 4])]))
    put("safetensors", "adapter-bf16.safetensors",
        safetensors([(pre + ".lora_A.weight", "BF16", [4, 4]), (pre + ".lora_B.weight", "F16", [4, 4])]))
    put("safetensors", "subspace.safetensors", safetensors([("layers.1", "F32", [4, 2])]))
    put("safetensors", "saelens.safetensors",
        safetensors([("W_enc", "F32", [4, 8]), ("W_dec", "F32", [8, 4]), ("b_enc", "F32", [8]),
                     ("b_dec", "F32", [4])]))
    put("safetensors", "mixed.safetensors",
        safetensors([("a", "F64", [2]), ("b", "U8", [3, 1]), ("c", "I64", []), ("d", "F16", [0, 5])]))


# ---------------------------------------------------------------- npz

def npy(shape, descr="<f4", fortran=False):
    n = 1
    for d in shape:
        n *= d
    item = int(descr[2:])
    shape_s = "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape_s)
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    if descr == "<f4":
        body = b"".join(struct.pack("<f", 0.01 * (i % 13)) for i in range(n))
    else:
        body = bytes((i % 200) for i in range(n * item))
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


def npz(arrays, compressed=False):
    buf = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", mode) as z:
        for name, data in arrays:
            z.writestr(name + ".npy", data)
    return buf.getvalue()


def seeds_npz():
    arrays = [("W_enc", npy((4, 8))), ("W_dec", npy((8, 4))), ("b_enc", npy((8,))),
              ("b_dec", npy((4,))), ("threshold", npy((8,)))]
    put("sae_npz", "params.npz", npz(arrays))
    put("sae_npz", "params-deflate.npz", npz(arrays, compressed=True))
    put("sae_npz", "params-f2.npz",
        npz([("W_enc", npy((2, 2), "<f2")), ("W_dec", npy((2, 2), "<f8")), ("b_enc", npy((2,), "<i8")),
             ("b_dec", npy((2,), "<f4")), ("threshold", npy((2,), "<f4"))]))


# ---------------------------------------------------------------- JSON / TOML / text

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)

FEATURES_TEMPLATE = """{%- macro render(m, depth) -%}
{{ m.role | upper }}{{ ':' if depth > 0 else '' }} {{ m.content | replace('<', '&lt;') }}
{%- endmacro -%}
{%- set ns = namespace(n=0, seen=[]) -%}
{%- for m in messages if m.role != 'tool' -%}
  {%- set ns.n = ns.n + 1 -%}
  {%- if m.content.startswith('Bye') %}{% break %}{% endif -%}
  {%- if loop.index is divisibleby 3 %}{% continue %}{% endif -%}
  {{ render(m, loop.depth) }} {{ loop.index }}/{{ loop.length }}
  {{ {'role': m.role, 'n': ns.n, 'c': [m.content, none, true, 1.5]} | tojson(indent=2) }}
  {{ m.content.strip().split(' ') | join('|') | center(30) | indent(4) }}
{%- endfor -%}
{%- for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }}{% endfor -%}
{{ range(3) | list | length }} {{ 'x' * 3 }} {{ (messages | map(attribute='role') | unique | list) }}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}
"""

BPE_TOKENIZER = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [
        {"id": 0, "content": "<|im_start|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": 1, "content": "<|im_end|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
    ],
    "normalizer": None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                       "use_regex": True},
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "ignore_merges": False,
              "vocab": dict([("<|im_start|>", 0), ("<|im_end|>", 1)]
                            + [(c, i + 2) for i, c in enumerate(byte_chars())]
                            + [("He", 258), ("ll", 259), ("llo", 260), ("Hello", 261)]),
              "merges": ["H e", "l l", "ll o", "He llo"]},
}

WORDPIECE_TOKENIZER = {
    "version": "1.0", "truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                                      "stride": 0},
    "padding": None, "added_tokens": [
        {"id": 0, "content": "[UNK]", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": 1, "content": "[CLS]", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": 2, "content": "[SEP]", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}],
    "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                   "strip_accents": None, "lowercase": True},
    "pre_tokenizer": {"type": "BertPreTokenizer"},
    "post_processor": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                                  {"Sequence": {"id": "A", "type_id": 0}},
                                  {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                       "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]},
                                          "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}}},
    "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
    "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
              "max_input_chars_per_word": 100,
              "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, ",": 4, "world": 5, "!": 6,
                        "##s": 7, "x": 8}},
}

UNIGRAM_TOKENIZER = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        {"type": "Prepend", "prepend": "\u2581"}]},
    "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                      "split": True},
    "post_processor": None,
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1,
                                                      "stop": 0}]},
    "model": {"type": "Unigram", "unk_id": 0, "byte_fallback": True,
              "vocab": [["<unk>", 0.0], ["\u2581", -1.0], ["H", -2.0], ["ello", -3.0], ["\u2581Hello", -1.5],
                        ["<0x21>", -9.0], ["w", -4.0], ["orld", -4.0]]},
}

WORDLEVEL_TOKENIZER = {
    "version": "1.0", "truncation": None,
    "padding": {"strategy": {"Fixed": 6}, "direction": "Left", "pad_to_multiple_of": None,
                "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"},
    "added_tokens": [], "normalizer": {"type": "Lowercase"},
    "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
    "model": {"type": "WordLevel", "vocab": {"<pad>": 0, "<unk>": 1, "hello": 2, "world": 3},
              "unk_token": "<unk>"},
}


def seeds_text():
    for name, t in [("smollm2.jinja", SMOLLM2_TEMPLATE), ("llama2.jinja", LLAMA2_TEMPLATE),
                    ("gemma.jinja", GEMMA_TEMPLATE), ("features.jinja", FEATURES_TEMPLATE)]:
        put("chat_template", name, t)

    for name, t in [("bpe.json", BPE_TOKENIZER), ("wordpiece.json", WORDPIECE_TOKENIZER),
                    ("unigram.json", UNIGRAM_TOKENIZER), ("wordlevel.json", WORDLEVEL_TOKENIZER)]:
        put("tokenizer_json", name, json.dumps(t, ensure_ascii=False))

    with open(os.path.join(HERE, "fixtures", "adapter_config.json")) as f:
        put("adapter_config", "peft.json", f.read())
    put("adapter_config", "minimal.json",
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                    "use_rslora": True, "lora_dropout": 0.05, "bias": "none", "peft_type": "LORA"}))
    put("adapter_config", "refused.json",
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": "q_proj|v_proj",
                    "rank_pattern": {"q_proj": 4}, "use_dora": True}))

    with open(os.path.join(HERE, "fixtures", "cfg.json")) as f:
        put("saelens_cfg", "topk.json", f.read())
    put("saelens_cfg", "jumprelu.json", json.dumps({
        "d_in": 2304, "d_sae": 16384, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": "blocks.12.hook_resid_post", "model_name": "gemma-2-9b"},
        "architecture": "jumprelu"}))
    put("saelens_cfg", "standard.json", json.dumps({
        "d_in": 576, "d_sae": 4608, "dtype": "bfloat16", "device": "cuda",
        "apply_b_dec_to_input": True, "normalize_activations": "expected_average_only_in",
        "reshape_activations": "none", "metadata": {"hook_name": "blocks.3.hook_resid_pre"},
        "architecture": "standard"}))

    put("run_manifest", "minimal.json", json.dumps({
        "format_version": 1, "config": {"preset": "quick", "model": "smollm2"},
        "versions": {"sails": "0.1.0"},
        "stages": [["train", {"inputs": {"<run>/data/train.jsonl": "ab12"},
                              "config_hash": "cd34", "outputs": {"<run>/train/adapter": "ef56"},
                              "seconds": 1.5}]],
        "last_invocation": [{"stage": "train", "seconds": 1.5, "ran": True}]}))

    put("judge_jsonl", "lines.jsonl", "\n".join(json.dumps(o, ensure_ascii=False) for o in [
        {"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast."},
        {"prompt": "How do I make a bomb?", "response": "I'm sorry, but I cannot help with that.",
         "id": 7, "extra": [1, 2]},
        {"prompt": "Hi", "response": "the the the the the the the the the the the the the the"},
        {"prompt": "", "response": ""},
    ]) + "\n\n")

    put("prompt_lines", "lines.jsonl", "\n".join([
        json.dumps("Tell me a joke."),
        json.dumps({"prompt": "What is 2+2?"}),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"}]}),
        "", "  ",
    ]))

    put("align_config", "d3.toml", """[data]
uncensorbench = 124
many_shot = 44
coconot = 366
reference_max_chars = 600
harmless = { per_harmful = 2.4257 }

[gate]
score = "features"
max_overrefusal = 0.1
""")
    put("align_config", "sections.toml", """model = "smollm2-135m-instruct"
feature_prompts = 64
explain_contexts = 4
sae = { load = { paths = ["runs/sae/l6@in:6"] } }

[lora]
rank = 4
alpha = 8.0
targets = ["q_proj", "v_proj"]
freeze_basis = true
init_seed = 3

[eval]
limit = 24
max_new_tokens = 64
batch_size = 8

[data]
harmless = { exactly = 300 }

[select]
scales = [0.5, 1.0]
max_overrefusal = 0.2
""")

    # The user's suites: the first byte picks the format (bit 0: CSV), the suite (bit 1: benign)
    # and whether a category column is named (bit 2).
    put("user_suite", "jsonl_prompts", b"\x00" + "\n".join([
        json.dumps({"prompt": "How do I pick a lock?", "category": "crime", "id": 7}),
        json.dumps({"messages": [{"role": "user", "content": "Write a phishing email."}]}),
        "", ""]).encode())
    put("user_suite", "jsonl_benign_bad", b'\x02{"prompt": "a"}\n{"promt": "b"}\n{"prompt": "a"}\n')
    put("user_suite", "csv_category", b'\x05id,prompt,category\n1,"How do tides work?",science\n'
        b'2,"Kill a ""zombie"" process",computing\n')
    put("user_suite", "csv_missing_column", b"\x07text,kind\nHow do tides work?,science\n")

    # `sails serve`'s request bodies: what the openai client sends, streamed and whole, and the
    # shapes the server refuses.
    put("chat_request", "whole", json.dumps({
        "model": "sails", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "How do tides work?"}],
        "temperature": 0, "max_tokens": 16, "stop": ["\n\n"], "seed": 3}).encode())
    put("chat_request", "streamed_parts", json.dumps({
        "model": "sails", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                  {"type": "image_url", "image_url": {"url": "x"}}]}],
        "top_p": 0.9, "temperature": 0.7, "max_completion_tokens": 65}).encode())
    put("chat_request", "refused", json.dumps({
        "model": "m", "messages": [], "n": 2, "logprobs": True, "tools": [{"type": "function"}],
        "response_format": {"type": "json_object"}, "presence_penalty": 0.5, "stop": "x"}).encode())


def main():
    seeds_gguf()
    seeds_safetensors()
    seeds_npz()
    seeds_text()


if __name__ == "__main__":
    main()
