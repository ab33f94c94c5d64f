// Y_c = W X_c (+ b) for the columns c of this pass: W is `rows x cols` raw ggml blocks of dtype
// DTYPE, X and Y hold one f32 vector per column (X_c at c * cols, Y_c at c * out_stride). A
// decode step has one column; a verify pass (speculative decoding) has one per position, so
// each weight row is fetched from memory once for up to COLS columns (workgroups along z take
// COLS columns each). Every column runs the same code a single column does, so a verify pass's
// logits equal the decode steps' to the bit.
// A workgroup of 64 computes 64 / LANES rows with LANES invocations each: the lanes of a row take
// its units in turn and are summed in workgroup memory. LANES is chosen per adapter: 16 on GPUs
// (neighbouring lanes read neighbouring blocks), 1 on CPU adapters such as lavapipe, where each
// barrier costs a switch between the workgroup's emulated invocations and one invocation per row
// runs several times faster. Large matrices are split into row chunks of at most
// one storage binding each; a chunk's rows land at y[out_offset + r].
// Uses lib/quant.wgsl and lib/dot.wgsl.

struct Params {
    rows: u32,
    cols: u32,
    row_bytes: u32,
    out_offset: u32,
    // Bit 0: add bias[out_offset + r].
    flags: u32,
    // Workgroups along x, to rebuild the flat workgroup index of a 2-D dispatch.
    groups_x: u32,
    // Values between one column's output and the next's: the whole matrix's rows.
    out_stride: u32,
    _pad1: u32,
}

struct Step {
    pos: u32,
    n_pos: u32,
    n_cols: u32,
    pos_row: u32,
}

override DTYPE: u32 = 0u;
// A power of two dividing 64.
override LANES: u32 = 16u;
// Columns per workgroup.
const COLS: u32 = 8u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read> BIAS: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;
@group(0) @binding(5) var<uniform> S: Step;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = (wg.x + wg.y * P.groups_x) * (64u / LANES) + li / LANES;
    let lane = li % LANES;
    let c0 = wg.z * COLS;
    let c1 = min(c0 + COLS, S.n_cols);
    var bias = 0.0;
    if ((P.flags & 1u) != 0u && r < P.rows) {
        bias = BIAS[P.out_offset + r];
    }
    for (var c = c0; c < c1; c++) {
        var acc = 0.0;
        if (r < P.rows) {
            acc = dot_row_part(DTYPE, r * P.row_bytes, P.cols, c * P.cols, lane, LANES);
        }
        let at = c * P.out_stride + P.out_offset + r;
        if (LANES == 1u) {
            if (r < P.rows) {
                Y[at] = acc + bias;
            }
            continue;
        }
        partial[li] = acc;
        workgroupBarrier();
        for (var s = LANES / 2u; s > 0u; s >>= 1u) {
            if (lane < s) {
                partial[li] += partial[li + s];
            }
            workgroupBarrier();
        }
        if (lane == 0u && r < P.rows) {
            Y[at] = partial[li] + bias;
        }
        // Everyone has read partial before the next column overwrites it.
        workgroupBarrier();
    }
}
