// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, one workgroup over the whole vector; workgroups
// along z take the pass's columns (vectors at c * n).
// The CPU sums squares in f64; here it is f32 in a tree, which differs by a few ulps.

struct Params {
    n: u32,
    eps: f32,
    // LayerNorm's bias flag (the Rust Params is shared with layer_norm.wgsl): always 0 here.
    flags: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> WEIGHT: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let o = wg.z * P.n;
    var acc = 0.0;
    for (var i = li; i < P.n; i += WG) {
        acc += X[o + i] * X[o + i];
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
    for (var i = li; i < P.n; i += WG) {
        Y[o + i] = X[o + i] * scale * WEIGHT[i];
    }
}
