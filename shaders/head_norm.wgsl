// RMSNorm of every head of a vector, in place (Qwen3's q and k norms, before RoPE): heads of
// `n` values, one workgroup per head (x) and column (z, vectors at c * heads * n), every head
// scaled by the same `n` weights. As in rms_norm.wgsl the squares are summed in f32 in a tree
// (the CPU sums in f64).

struct Params {
    n: u32,
    eps: f32,
    // The Rust Params is shared with rms_norm.wgsl and layer_norm.wgsl: always 0 here.
    flags: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> WEIGHT: array<f32>;
@group(0) @binding(2) var<storage, read_write> V: array<f32>;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let o = (wg.z * groups.x + wg.x) * P.n;
    var acc = 0.0;
    for (var i = li; i < P.n; i += WG) {
        acc += V[o + i] * V[o + i];
    }
    red[li] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(red[0] / f32(P.n) + P.eps);
    // Each invocation rewrites only the values it read itself.
    for (var i = li; i < P.n; i += WG) {
        V[o + i] = V[o + i] * scale * WEIGHT[i];
    }
}
