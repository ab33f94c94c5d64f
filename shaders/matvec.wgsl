// y = W x (+ b): W is `rows x cols` raw ggml blocks of dtype DTYPE, x and y are f32.
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
    _pad0: u32,
    _pad1: u32,
}

override DTYPE: u32 = 0u;
// A power of two dividing 64.
override LANES: u32 = 16u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read> BIAS: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = (wg.x + wg.y * P.groups_x) * (64u / LANES) + li / LANES;
    let lane = li % LANES;
    var acc = 0.0;
    if (r < P.rows) {
        acc = dot_row_part(DTYPE, r * P.row_bytes, P.cols, 0u, lane, LANES);
    }
    if (LANES == 1u) {
        if (r < P.rows) {
            Y[P.out_offset + r] = acc + select(0.0, BIAS[P.out_offset + r], (P.flags & 1u) != 0u);
        }
        return;
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
        var y = partial[li];
        if ((P.flags & 1u) != 0u) {
            y += BIAS[P.out_offset + r];
        }
        Y[P.out_offset + r] = y;
    }
}
