#!/usr/bin/env python3
"""Writes the quantisation fixtures under tests/fixtures/quant/, from the `gguf` package
(llama.cpp's own Python port of ggml's reference (de)quantisers), so the Rust tests check our
formats against an implementation we did not write:

- q5.json: a few blocks of f32 values with their Q5_0 and Q5_1 quantisation and
  dequantisation.
- k.json: raw K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) with their dequantisation;
  iq4.json the same for IQ4_NL and IQ4_XS. gguf-py cannot quantise these formats (its quantisers stop at Q8_0/Q5_1), so the blocks are
  pseudo-random bytes with chosen f16 super-block scales: every bit pattern of the packed
  scales and quants is as likely, which covers the unpacking better than a quantiser's output
  would, and dequantisation is defined for any bytes.

    pip install gguf==0.19.0 && python3 tools/make_quant_fixtures.py

Every number is stored as little-endian hex of its bytes (f32 values too), so nothing is lost
to decimal printing. The output is deterministic (fixed seed); rerunning it must not change the
committed file.
"""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

QK = 32


def inputs() -> np.ndarray:
    rng = np.random.default_rng(20240605)
    blocks = []
    # Random blocks of very different magnitudes, as activations and weights have.
    for scale in (1.0, 0.02, 7.5, 1e-3, 0.3):
        blocks.append(rng.uniform(-scale, scale, QK))
    # All zero: d = 0, so ggml's `id = d ? 1/d : 0` branch.
    blocks.append(np.zeros(QK))
    # All positive (Q5_0's scale is then negative; Q5_1's min is positive).
    blocks.append(rng.uniform(0.5, 2.0, QK))
    # A constant block: Q5_1's max == min, so d = 0 again but m carries the value.
    blocks.append(np.full(QK, -0.75))
    # Scale exactly 1 in both formats (Q5_0: max -16; Q5_1: range -16..15), the other values
    # halfway between two levels: the quantisers' rounding ties, which ggml breaks upwards.
    blocks.append(np.concatenate([[-16.0, 15.0], np.arange(-15, 15) + 0.5]))
    return np.concatenate(blocks).astype(np.float32)


# Where each K-quant block keeps its f16 super-block scale(s) (ggml-common.h's `block_*`).
K_TYPES = (
    ("q2_k", GGMLQuantizationType.Q2_K, (80, 82)),
    ("q3_k", GGMLQuantizationType.Q3_K, (108,)),
    ("q4_k", GGMLQuantizationType.Q4_K, (0, 2)),
    ("q5_k", GGMLQuantizationType.Q5_K, (0, 2)),
    ("q6_k", GGMLQuantizationType.Q6_K, (208,)),
)

# The same for IQ4_NL (blocks of 32) and IQ4_XS.
IQ4_TYPES = (
    ("iq4_nl", GGMLQuantizationType.IQ4_NL, (0,)),
    ("iq4_xs", GGMLQuantizationType.IQ4_XS, (0,)),
)

# Super-block scales, one row per block: ordinary, negative, tiny (an f16 subnormal) and zero.
K_SCALES = ((0.0123, 0.0041), (-0.5, 0.25), (6.0e-6, -3.0e-6), (0.0, 0.0))


def k_blocks(qtype: GGMLQuantizationType, scale_at: tuple) -> np.ndarray:
    _, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(20240606 + int(qtype))
    blocks = rng.integers(0, 256, size=(len(K_SCALES), nbytes), dtype=np.uint8)
    for block, scales in zip(blocks, K_SCALES):
        for at, v in zip(scale_at, scales):
            block[at : at + 2] = np.frombuffer(np.float16(v).astype("<f2").tobytes(), np.uint8)
    return blocks


def hexle(a: np.ndarray) -> str:
    return a.astype(a.dtype.newbyteorder("<")).tobytes().hex()


def write(name: str, out: dict) -> None:
    path = Path(__file__).resolve().parent.parent / "tests/fixtures/quant" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    x = inputs()
    out = {
        "about": f"tools/make_quant_fixtures.py with gguf {version('gguf')}; all values little-endian hex",
        "block_len": QK,
        "input_f32": hexle(x),
    }
    for name, qtype in (("q5_0", GGMLQuantizationType.Q5_0), ("q5_1", GGMLQuantizationType.Q5_1)):
        q = quantize(x.reshape(1, -1), qtype)
        y = dequantize(q, qtype).reshape(-1).astype(np.float32)
        out[name] = {"blocks": hexle(q.reshape(-1)), "dequantized_f32": hexle(y)}
    write("q5.json", out)

    for file, types in (("k.json", K_TYPES), ("iq4.json", IQ4_TYPES)):
        out = {
            "about": f"tools/make_quant_fixtures.py with gguf {version('gguf')}; all values little-endian hex",
        }
        for name, qtype, scale_at in types:
            blocks = k_blocks(qtype, scale_at)
            y = dequantize(blocks.reshape(-1), qtype).reshape(-1).astype(np.float32)
            assert np.isfinite(y).all(), name
            out[name] = {"ggml_type": int(qtype), "blocks": hexle(blocks.reshape(-1)), "dequantized_f32": hexle(y)}
        write(file, out)


if __name__ == "__main__":
    main()
