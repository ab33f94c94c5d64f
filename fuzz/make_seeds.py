#!/usr/bin/env python3
"""Writes the small seed corpora in fuzz/corpus/<target>/ (committed; rerun to regenerate)."""
import json
import struct
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
REPO = ROOT.parent


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# --- GGUF -------------------------------------------------------------------------------
def gguf(kvs, tensors, version=3, align=32):
    def s(x):
        x = x.encode()
        return struct.pack("<Q", len(x)) + x

    def val(t, v):
        if t == 8:
            return s(v)
        if t == 9:
            et, items = v
            return struct.pack("<IQ", et, len(items)) + b"".join(val(et, i) for i in items)
        fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[t]
        return struct.pack("<" + fmt, v)

    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for k, t, v in kvs:
        out += s(k) + struct.pack("<I", t) + val(t, v)
    off = 0
    blobs = []
    for name, dims, ggml_type, data in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, off)
        blobs.append((off, data))
        off += (len(data) + align - 1) // align * align
    out += b"\0" * ((-len(out)) % align)
    base = len(out)
    buf = bytearray(off)
    for o, data in blobs:
        buf[o : o + len(data)] = data
    return out + bytes(buf) if base else out


def byte_level():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


b2u = byte_level()
tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + b2u + ["Ġt", "he", "Ġthe", "in"]
types = [3, 3, 3] + [1] * (len(tokens) - 3)
merges = ["Ġ t", "h e", "Ġt he", "i n"]
tok_kvs = [
    ("general.architecture", 8, "llama"),
    ("tokenizer.ggml.model", 8, "gpt2"),
    ("tokenizer.ggml.pre", 8, "smollm"),
    ("tokenizer.ggml.tokens", 9, (8, tokens)),
    ("tokenizer.ggml.token_type", 9, (5, types)),
    ("tokenizer.ggml.merges", 9, (8, merges)),
    ("tokenizer.ggml.bos_token_id", 4, 1),
    ("tokenizer.ggml.eos_token_id", 4, 2),
    ("tokenizer.ggml.add_bos_token", 7, False),
]
put("gguf", "tokenizer", gguf(tok_kvs, []))
put(
    "gguf",
    "all-types",
    gguf(
        [
            ("u8", 0, 7), ("i8", 1, -7), ("u16", 2, 700), ("i16", 3, -700), ("u32", 4, 70000),
            ("i32", 5, -70000), ("f32", 6, 1.5), ("bool", 7, True), ("str", 8, "héllo"),
            ("u64", 10, 1 << 40), ("i64", 11, -(1 << 40)), ("f64", 12, 2.5),
            ("arr", 9, (9, [(8, ["a", "b"]), (4, [1, 2])])),
            ("general.alignment", 4, 64),
        ],
        [("t.f32", [4, 2], 0, b"\0" * 32), ("t.f16", [8], 1, b"\0" * 16)],
        align=64,
    ),
)
# q8_0 (type 8): 32 elements in 34 bytes; q4_1 (type 3): 32 in 20
put("gguf", "quant", gguf([("general.architecture", 8, "llama")],
                          [("q8", [32, 2], 8, b"\1" * 68), ("q4_1", [32], 3, b"\2" * 20)], version=2))

# --- safetensors ------------------------------------------------------------------------
def safetensors(entries, meta=None):
    header = {}
    if meta is not None:
        header["__metadata__"] = meta
    data = b""
    for name, dtype, shape, n_bytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n_bytes]}
        data += bytes(range(n_bytes % 256)) + b"\0" * (n_bytes - n_bytes % 256)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


put("safetensors", "small", safetensors(
    [("model.embed_tokens.weight", "F32", [4, 3], 48), ("model.norm.weight", "F16", [3], 6),
     ("lm_head.weight", "BF16", [2, 2, 2], 16), ("scalar", "F32", [], 4)],
    meta={"format": "pt"},
))
put("safetensors", "skipped-buffer", safetensors(
    [("model.layers.0.self_attn.rotary_emb.inv_freq", "F32", [2], 8),
     ("model.decoder.embed_positions.position_ids", "I64", [1, 2], 16)]))
put("safetensors", "empty", safetensors([]))

# --- config.json ------------------------------------------------------------------------
for d in sorted((REPO / "tests/fixtures/hf").iterdir()):
    c = d / "config.json"
    if c.is_file():
        put("hf_config", d.name, c.read_bytes())

# --- flash image ------------------------------------------------------------------------
hidden, ffn = 32, 4
part = lambda role, off: {"role": role, "dtype": "F32", "offset": off, "len": 4 * hidden, "elems": hidden}
meta = {
    "format": 1,
    "config": {"arch": "Llama", "vocab_size": 8, "hidden_size": hidden, "intermediate_size": ffn,
               "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "norm_eps": 1e-5,
               "rope_theta": 10000.0, "rope_style": "Adjacent", "max_positions": 64,
               "tied_embeddings": True, "pre_norm": True, "embed_dim": hidden},
    "tokenizer": {"Spec": {"model": "gpt2", "pre": "smollm", "tokens": tokens[:3] + b2u,
                           "token_types": [3, 3, 3] + [1] * 256, "merges": [], "bos": 1, "eos": 2,
                           "eot": None, "pad": None, "add_bos": False, "add_eos": False}},
    "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "source": {"path": "x.gguf", "format": "gguf", "size": 1},
    "position_offset": 0,
    "tensors": [{"name": "output_norm.weight", "dtype": "F32", "rows": 1, "cols": hidden,
                 "offset": 8192, "len": 4 * hidden, "crc32": zlib.crc32(b"\0" * 4 * hidden)}],
    "bundle": {"parts": [part("gate", 0), part("up", 4 * hidden), part("down", 8 * hidden)],
               "stride": 12 * hidden},
    "ffn": [{"layer": 0, "offset": 4096, "len": ffn * 12 * hidden, "n_neurons": ffn, "crc32": 0,
             "permutation": [3, 1, 2, 0]}],
    "extra": {"calibration": {"blobs": {"frequencies": {"crc32": 0, "len": 16, "offset": 4096}}}},
}
meta_bytes = json.dumps(meta).encode()
# odd mode byte: header with correct checksums written by the target; (3 >> 1) & 3 = 1 page
# of zeros would not hold the tensor at 8192, so use mode 5: two pages of zeros.
put("flash_image", "meta-2pages", bytes([5]) + meta_bytes)
# even mode byte: the whole image, as on disk.
def image(meta_b, pages):
    off = 4096 * (1 + pages)
    h = bytearray(off)
    h[0:8] = b"LLMFLASH"
    h[8:12] = struct.pack("<I", 1)
    h[16:32] = struct.pack("<QQ", off, len(meta_b))
    h[32:36] = struct.pack("<I", zlib.crc32(meta_b))
    h[36:40] = struct.pack("<I", zlib.crc32(bytes(h[:36])))
    return bytes(h) + meta_b
small = {**meta, "tokenizer": None, "chat_template": None}
put("flash_image", "raw-image", bytes([0]) + image(json.dumps(small).encode(), 2))
put("flash_image", "raw-header-only", bytes([0]) + image(b"{}", 0)[:4096])

# --- tokenizer --------------------------------------------------------------------------
texts = {
    "english": "Hello, world! The quick brown fox jumps over the lazy dog's 3 tails.\n",
    "code": "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n\tprintln!(\"{x:?}\");\n}\n",
    "unicode": "héllo wörld — 日本語のテキスト 🦀🚀 Ελληνικά русский عربى \u00a0\u200b",
    "special": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> <|im_start|>",
    "spaces-digits": "   leading  spaces\n\n\n 12345678901234 3.14159 1,000,000 it's we'll THEY'RE",
}
for k, v in texts.items():
    put("tokenizer", k, v)

# --- chat template ----------------------------------------------------------------------
def chat(flags, template, msgs):
    parts = [template] + [f"{r}\x01{c}" for r, c in msgs]
    return bytes([flags]) + "\0".join(parts).encode()

conv = [("system", "You are terse."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "2+2?")]
put("chat_template", "smollm2-real", chat(1, "", conv))
put("chat_template", "smollm2-text", chat(1, (REPO / "fuzz/seeds/smollm2.jinja").read_text(), conv))
put("chat_template", "python-methods", chat(0, (REPO / "fuzz/seeds/methods.jinja").read_text(), conv))
put("chat_template", "qwen-like", chat(1, (REPO / "fuzz/seeds/qwen-like.jinja").read_text(), conv))
put("chat_template", "loops-macros", chat(1, (REPO / "fuzz/seeds/loops.jinja").read_text(), conv[:2]))
