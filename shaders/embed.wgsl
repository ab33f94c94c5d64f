// Embedding gather: y = row `row` of a table of raw ggml blocks (DTYPE), dequantised to f32.
// The row comes from the per-token Step uniform (the token's row, or the position's row for
// learned positions), relative to the chunk bound here. With bit 1 of flags, y += the row.
// Uses lib/quant.wgsl.

struct Params {
    cols: u32,
    row_bytes: u32,
    // Bit 0: the row is Step.pos_row (else Step.token_row). Bit 1: accumulate into y.
    flags: u32,
    _pad: u32,
}

// Written once per token: what changes between decode steps.
struct Step {
    pos: u32,
    n_pos: u32,
    token_row: u32,
    pos_row: u32,
}

override DTYPE: u32 = 0u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> S: Step;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= P.cols) {
        return;
    }
    let row = select(S.token_row, S.pos_row, (P.flags & 1u) != 0u);
    let v = w_value(DTYPE, row * P.row_bytes, j);
    if ((P.flags & 2u) != 0u) {
        Y[j] += v;
    } else {
        Y[j] = v;
    }
}
