// Embedding gather: column c of Y = row `row_c` of a table of raw ggml blocks (DTYPE),
// dequantised to f32. Token embeddings take row_c = ROWS[c] (the pass's tokens, written with the
// Step uniform); learned positions take row_c = Step.pos_row + c. Rows are the table's; a large
// table is split into chunks of one binding each, one dispatch per chunk, and a chunk writes
// only the columns whose row it holds. With bit 1 of flags, Y_c += the row. Workgroups along z
// take the columns. Uses lib/quant.wgsl.

struct Params {
    cols: u32,
    row_bytes: u32,
    // Bit 0: the row is Step.pos_row + c (else ROWS[c]). Bit 1: accumulate into Y.
    flags: u32,
    // The table rows this chunk holds: first_row .. first_row + rows.
    first_row: u32,
    rows: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Step {
    pos: u32,
    n_pos: u32,
    n_cols: u32,
    pos_row: u32,
}

override DTYPE: u32 = 0u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> S: Step;
@group(0) @binding(4) var<storage, read> ROWS: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let c = gid.z;
    let row = select(ROWS[c], S.pos_row + c, (P.flags & 1u) != 0u);
    if (j >= P.cols || row < P.first_row || row - P.first_row >= P.rows) {
        return;
    }
    let v = w_value(DTYPE, (row - P.first_row) * P.row_bytes, j);
    let at = c * P.cols + j;
    if ((P.flags & 2u) != 0u) {
        Y[at] += v;
    } else {
        Y[at] = v;
    }
}
