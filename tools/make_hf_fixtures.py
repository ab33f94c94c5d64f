#!/usr/bin/env python3
"""Write tiny random HF checkpoints (safetensors + config.json) and transformers' logits for a
fixed token sequence, as references for llmflash's safetensors loaders. Run through
tools/make-hf-fixtures.sh; CI never runs this, it only reads tests/fixtures/hf/.

Weights are drawn wider than transformers' default init (std 0.15, norms around 1, biases
non-zero) so that a loader that skips a norm, a bias or a projection visibly fails.
"""
import json
import os
import sys

import torch
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf"
TOKENS = [1, 17, 200, 45, 3, 99, 128, 7, 250, 31, 64, 5, 180, 77, 12, 140]


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def write(name, model_cls, config, seed, dtype=torch.float32, shard=None):
    torch.manual_seed(seed)
    model = model_cls(config)
    randomize(model, seed)
    model = model.to(dtype)
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(path, **kwargs)
    # The reference is f32 math over the weights as saved (bf16/f16 rounded, then upcast).
    ref = model_cls.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        logits = ref(ids).logits[0]
        greedy = ref.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True,
                              pad_token_id=0)[0, len(TOKENS):]
    doc = {
        "architecture": config.model_type,
        "dtype": str(dtype).replace("torch.", ""),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokens": TOKENS,
        "logits": [[float(v) for v in row] for row in logits],
        "greedy": [int(t) for t in greedy],
    }
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(doc, f)
    print(name, "written", file=sys.stderr)


def llama_config(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def main():
    write("llama", LlamaForCausalLM, llama_config(), seed=1)
    write("llama-tied", LlamaForCausalLM,
          llama_config(tie_word_embeddings=True, rope_theta=100000.0), seed=2,
          dtype=torch.bfloat16)
    write("llama-sharded", LlamaForCausalLM, llama_config(), seed=3, shard="100KB")
    write("qwen2", Qwen2ForCausalLM,
          Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=True,
                      use_sliding_window=False),
          seed=4, dtype=torch.float16)
    opt = dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, pad_token_id=1,
               bos_token_id=2, eos_token_id=2)
    write("opt", OPTForCausalLM,
          OPTConfig(**opt, do_layer_norm_before=True, word_embed_proj_dim=64), seed=5)
    write("opt-proj", OPTForCausalLM,
          OPTConfig(**opt, do_layer_norm_before=False, word_embed_proj_dim=32), seed=6)


if __name__ == "__main__":
    main()
