// LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b, one workgroup over the whole vector;
// mean first, then the variance around it (two passes, as the CPU reference).

struct Params {
    n: u32,
    eps: f32,
    // Bit 0: add BIAS.
    flags: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> WEIGHT: array<f32>;
@group(0) @binding(3) var<storage, read> BIAS: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

fn reduce_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // Everyone has read the total before the next reduction overwrites red.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let o = wg.z * P.n;
    let n = f32(P.n);
    var acc = 0.0;
    for (var i = li; i < P.n; i += WG) {
        acc += X[o + i];
    }
    let mean = reduce_sum(li, acc) / n;
    var sq = 0.0;
    for (var i = li; i < P.n; i += WG) {
        sq += (X[o + i] - mean) * (X[o + i] - mean);
    }
    let scale = 1.0 / sqrt(reduce_sum(li, sq) / n + P.eps);
    let has_bias = (P.flags & 1u) != 0u;
    for (var i = li; i < P.n; i += WG) {
        var y = (X[o + i] - mean) * scale * WEIGHT[i];
        if (has_bias) {
            y += BIAS[i];
        }
        Y[o + i] = y;
    }
}
