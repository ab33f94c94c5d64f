#!/usr/bin/env python3
"""Writes tests/fixtures/quant/q5.json: a few blocks of f32 values with their Q5_0 and Q5_1
quantisation and dequantisation by the `gguf` package (llama.cpp's own Python port of ggml's
reference quantisers), so the Rust tests check our formats against an implementation we did
not write.

    pip install gguf==0.19.0 && python3 tools/make_quant_fixtures.py

Every number is stored as little-endian hex of its bytes (f32 values too), so nothing is lost
to decimal printing. The output is deterministic (fixed seed); rerunning it must not change the
committed file.
"""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
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


def hexle(a: np.ndarray) -> str:
    return a.astype(a.dtype.newbyteorder("<")).tobytes().hex()


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
    path = Path(__file__).resolve().parent.parent / "tests/fixtures/quant/q5.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
