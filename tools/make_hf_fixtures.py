#!/usr/bin/env python3
"""Write tiny random HF checkpoints (safetensors + config.json) and transformers' logits for a
fixed token sequence, as references for llmflash's safetensors loaders. Run through
tools/make-hf-fixtures.sh; CI never runs this, it only reads tests/fixtures/hf/.

Weights are drawn wider than transformers' default init (std 0.15, norms around 1, biases
non-zero) so that a loader that skips a norm, a bias or a projection visibly fails.

Every forward pass and generate() call gets an explicit all-ones attention mask: OPT derives its
learned positions from the mask (cumsum - 1, then + 2), and generate() would otherwise build a
mask from pad_token_id. The greedy continuation is re-checked against argmax of full (uncached)
forward passes, and EOS is disabled so generate() always emits all 8 tokens.

    make_hf_fixtures.py OUT [NAME...]

With NAMEs, only those checkpoints are written again; the others are left as they are (their
tensor tables for README.md are read back from OUT).
"""
import json
import os
import sys

import numpy
import safetensors
import torch
import transformers
from safetensors import safe_open
from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf"
ONLY = set(sys.argv[2:])
# 16 ids < 256. Llama/qwen2 start with 1 (llama's BOS); OPT starts with 2, its BOS (1 is OPT's
# pad id, which we keep out of the sequence).
TOKENS = [1, 17, 200, 45, 3, 99, 128, 7, 250, 31, 64, 5, 180, 77, 12, 140]
OPT_TOKENS = [2] + TOKENS[1:]
NEW_TOKENS = 8


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def tensor_list(path):
    """[(name, dtype, shape, file)] over every .safetensors file in path, sorted by name."""
    rows = []
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), framework="np") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    rows.append((key, sl.get_dtype(), list(sl.get_shape()), fname))
    return sorted(rows)


def write_checkpoint(name, model_cls, config, seed, tokens, dtype=torch.float32, shard=None):
    torch.manual_seed(seed)
    model = model_cls(config)
    randomize(model, seed)
    model = model.to(dtype)
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    for fname in os.listdir(path):  # drop stale shards from an earlier run
        if fname.endswith(".safetensors") or fname.endswith(".index.json"):
            os.remove(os.path.join(path, fname))
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(path, **kwargs)

    # The reference is f32 math over the weights as saved (bf16/f16 rounded, then upcast).
    ref = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # never stop early
    ids = torch.tensor([tokens])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask).logits[0]
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                           do_sample=False, use_cache=True, pad_token_id=0)
        greedy = out[0, len(tokens):].tolist()
        assert len(greedy) == NEW_TOKENS, greedy
        # Same continuation without the KV cache: argmax of a full forward pass at each step.
        seq = list(tokens)
        for _ in range(NEW_TOKENS):
            t = torch.tensor([seq])
            seq.append(int(ref(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, -1]
                           .argmax()))
        assert seq[len(tokens):] == greedy, (name, seq[len(tokens):], greedy)
    assert logits.shape == (len(tokens), config.vocab_size)
    spread = float(logits.std())
    assert spread > 0.5, (name, spread)  # not the near-zero logits of the default init

    doc = {
        "architecture": config.model_type,
        "dtype": str(dtype).replace("torch.", ""),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokens": list(tokens),
        "logits": [[float(v) for v in row] for row in logits],  # f32 values, exact
        "greedy": [int(t) for t in greedy],
    }
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(doc, f)
    print(f"{name}: logits std {spread:.3f}, greedy {greedy}", file=sys.stderr)
    return tensor_list(path)


def llama_config(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


OPT_BASE = dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, pad_token_id=1,
                bos_token_id=2, eos_token_id=2)

FACTS = {
    "llama": """LlamaForCausalLM, float32. hidden 64, intermediate 128 (SiLU gated MLP), 2 layers,
4 heads x head_dim 16, 2 KV heads (GQA, 2 query heads per KV head), rope_theta 10000 (HF
rotate_half layout: the rotary pairs are (i, i + 8) within a head, not interleaved),
rms_norm_eps 1e-5, no biases, `tie_word_embeddings: false` (separate `lm_head.weight`).""",
    "llama-tied": """LlamaForCausalLM saved in **bfloat16** (`"dtype": "bfloat16"` in config.json).
Same shapes as `llama`, but rope_theta **100000** and `tie_word_embeddings: true`: there is
**no `lm_head.weight`** in the file, the output projection is `model.embed_tokens.weight`.
Reference logits are f32 math over the bf16 weights upcast to f32.""",
    "llama-sharded": """The `llama` config (different random weights, seed 3) saved with
`max_shard_size="100KB"`: 5 shards `model-0000N-of-00005.safetensors` plus
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). There is no
`model.safetensors`.""",
    "qwen2": """Qwen2ForCausalLM saved in **float16**. hidden 64, intermediate 128, 2 layers, 4 heads
x 16, 2 KV heads, rope_theta 10000, rms_norm_eps **1e-6**, **q/k/v projections have biases**
(o_proj and the MLP have none), `tie_word_embeddings: true` (no `lm_head.weight`),
no sliding window. Reference logits are f32 math over the f16 weights upcast to f32.""",
    "qwen3": """Qwen3ForCausalLM saved in **bfloat16**. hidden 64, intermediate 128, 2 layers,
4 heads, 2 KV heads, **head_dim 24** (given in config.json; 4 x 24 = 96 is not the hidden size,
so q_proj is [96, 64], k_proj/v_proj [48, 64], o_proj [64, 96]), rope_theta 1000000 (HF
rotate_half layout), rms_norm_eps 1e-6, **no biases**, and per layer **`self_attn.q_norm` and
`self_attn.k_norm`** ([24] each): an RMSNorm over each head of q and of k (eps rms_norm_eps)
after the projection and before RoPE. Attention scaling 1/sqrt(head_dim = 24).
`tie_word_embeddings: true` (no `lm_head.weight`), no sliding window. Reference logits are
f32 math over the bf16 weights upcast to f32.""",
    "opt": """OPTForCausalLM, float32. hidden 64, ffn_dim 128 (ReLU, fc1/fc2, both with bias),
2 layers, 4 heads x 16, all linear layers and LayerNorms have biases, LayerNorm eps 1e-5.
**Learned positions with offset 2**: `embed_positions.weight` has 128 + 2 = 130 rows and the
token at position p (0-based, no padding) uses row **p + 2**. Embeddings are not scaled
(no sqrt(d)). `do_layer_norm_before: true` (**pre-LN**: x + attn(LN(x)), x + mlp(LN(x))) and
a final `model.decoder.final_layer_norm` before the LM head. word_embed_proj_dim = hidden = 64,
so no project_in/out. `lm_head` is tied to `model.decoder.embed_tokens.weight` (not in the file).
Attention scaling is 1/sqrt(head_dim), applied to q (q_proj output * 0.25), causal.
Naming trap: inside a layer, `self_attn_layer_norm` is the attention LN and
`final_layer_norm` is the **MLP** LN; `model.decoder.final_layer_norm` (no `layers.N.`) is
the decoder's final LN. Tokens start with 2 (OPT's BOS); 1 is OPT's pad id and is not used.
Checked against an independent numpy implementation reading the safetensors (max abs error
~2e-6).""",
    "opt-proj": """OPTForCausalLM, float32, like opt-350m: `word_embed_proj_dim: 32`, so
`embed_tokens.weight` is [256, 32], **`project_in`** ([64, 32], no bias) maps token embeddings
32 -> 64 **before** the positions are added (positions are [130, 64], offset 2 as in `opt`),
and **`project_out`** ([32, 64], no bias) maps 64 -> 32 after the last layer; the tied LM head
is embed_tokens [256, 32]. `do_layer_norm_before: false` (**post-LN**:
x = LN(x + attn(x)), x = LN(x + mlp(x))). With post-LN, transformers (this version) builds
**no final layer norm** (`final_layer_norm = None` when `do_layer_norm_before` is false), and
the file has no `model.decoder.final_layer_norm.*`: the last layer's output goes straight
to project_out and the LM head. (Rule in modeling_opt.py: a final LN exists iff
`do_layer_norm_before and not _remove_final_layer_norm`; `_remove_final_layer_norm` is a
legacy flag for checkpoints fine-tuned before transformers 4.20.1. A loader should key on
both flags, or simply on whether `model.decoder.final_layer_norm.weight` is present.)
Checked against an independent numpy implementation (max abs error ~2e-6).""",
}


def fmt_shape(s):
    return "[" + ",".join(str(x) for x in s) + "]"


def write_readme(tables):
    lines = [
        "# HF transformers fixtures",
        "",
        "Tiny random checkpoints (hidden 64, 2 layers, vocab 256) written by HF transformers'",
        "`save_pretrained(dir, safe_serialization=True)`, with transformers' own logits, as",
        "references for llmflash's safetensors loaders (`tests/hf_reference.rs`).",
        "",
        "Generated by `tools/make-hf-fixtures.sh` (venv in `$HF_VENV`, default",
        "`/tmp/llmflash-hf-venv`; pinned in `tools/requirements-hf-fixtures.txt`), which runs",
        "`python tools/make_hf_fixtures.py tests/fixtures/hf`. CPU only, fixed seeds: two runs give",
        "byte-identical `reference.json` files.",
        "",
        f"Versions: transformers {transformers.__version__}, torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}, numpy {numpy.__version__}.",
        "",
        "Weights: every parameter re-drawn from N(0, 0.15²), norm weights 1 + N(0, 0.2²), biases",
        "N(0, 0.1²), so logits are O(1) and a loader that drops a norm, bias or projection fails.",
        "",
        "## Files per checkpoint",
        "",
        "- `config.json`, `generation_config.json`: as written by transformers.",
        "- `model.safetensors` (or shards + `model.safetensors.index.json`).",
        "- `reference.json`:",
        "  ```",
        '  {"architecture": str (config model_type: "llama" | "qwen2" | "qwen3" | "opt"),',
        '   "dtype": str (dtype of the saved weights: "float32" | "bfloat16" | "float16"),',
        '   "transformers_version": str, "torch_version": str,',
        '   "tokens": [16 ints],',
        '   "logits": [16 x [256 floats]],   // f32 logits at every position, one forward pass',
        '   "greedy": [8 ints]}              // generate(do_sample=False, max_new_tokens=8,',
        "                                    //   use_cache=True) after `tokens`, EOS disabled",
        "  ```",
        "  Logits come from the checkpoint as saved, loaded back in float32 (so bf16/f16",
        "  checkpoints are f32 math over the rounded weights), with an all-ones attention mask.",
        "  `greedy` is also checked against argmax of uncached full forward passes.",
        "",
        "## Checkpoints",
        "",
    ]
    for name, rows in tables:
        lines += [f"### `{name}`", "", FACTS[name], "", "Tensors:", "", "```"]
        w = max(len(r[0]) for r in rows)
        for key, dt, shape, fname in rows:
            extra = f"  ({fname})" if name == "llama-sharded" else ""
            lines.append(f"{key.ljust(w)}  {dt}  {fmt_shape(shape)}{extra}")
        lines += ["```", ""]
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    unknown = ONLY - set(FACTS)
    assert not unknown, f"no such checkpoint: {sorted(unknown)}; known: {sorted(FACTS)}"

    def write(name, *args, **kwargs):
        if ONLY and name not in ONLY:
            return tensor_list(os.path.join(OUT, name))
        return write_checkpoint(name, *args, **kwargs)

    tables = []
    tables.append(("llama", write("llama", LlamaForCausalLM, llama_config(), seed=1,
                                  tokens=TOKENS)))
    tables.append(("llama-tied", write(
        "llama-tied", LlamaForCausalLM,
        llama_config(tie_word_embeddings=True, rope_theta=100000.0), seed=2, tokens=TOKENS,
        dtype=torch.bfloat16)))
    tables.append(("llama-sharded", write("llama-sharded", LlamaForCausalLM, llama_config(),
                                          seed=3, tokens=TOKENS, shard="100KB")))
    tables.append(("qwen2", write(
        "qwen2", Qwen2ForCausalLM,
        Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=True,
                    use_sliding_window=False),
        seed=4, tokens=TOKENS, dtype=torch.float16)))
    tables.append(("opt", write(
        "opt", OPTForCausalLM,
        OPTConfig(**OPT_BASE, do_layer_norm_before=True, word_embed_proj_dim=64),
        seed=5, tokens=OPT_TOKENS)))
    tables.append(("opt-proj", write(
        "opt-proj", OPTForCausalLM,
        OPTConfig(**OPT_BASE, do_layer_norm_before=False, word_embed_proj_dim=32),
        seed=6, tokens=OPT_TOKENS)))
    tables.append(("qwen3", write(
        "qwen3", Qwen3ForCausalLM,
        Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=128,
                    tie_word_embeddings=True, use_sliding_window=False),
        seed=7, tokens=TOKENS, dtype=torch.bfloat16)))
    # Facts the README states about the qwen3 checkpoint.
    qwen3 = {r[0]: r[2] for r in tables[6][1]}
    assert qwen3["model.layers.0.self_attn.q_proj.weight"] == [96, 64], qwen3
    assert qwen3["model.layers.0.self_attn.q_norm.weight"] == [24], qwen3
    assert not any(n.endswith("bias") or n == "lm_head.weight" for n in qwen3), qwen3
    # Facts the README states about the OPT variants.
    names = {r[0] for r in tables[5][1]}
    assert not any("final_layer_norm" in n and "layers" not in n for n in names), names
    assert "model.decoder.project_in.weight" in names and "model.decoder.project_out.weight" in names
    assert "model.decoder.final_layer_norm.weight" in {r[0] for r in tables[4][1]}
    assert not any(r[0] == "lm_head.weight" for r in tables[1][1] + tables[3][1])
    write_readme(tables)


if __name__ == "__main__":
    main()
