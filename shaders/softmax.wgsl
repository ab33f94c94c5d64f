// In-place softmax of `rows` rows of `n` values (row r starts at r * stride), numerically
// stable (max subtracted). One workgroup per row.

struct Params {
    n: u32,
    stride: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> V: array<f32>;

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

fn reduce(li: u32, v: f32, is_max: bool) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            if (is_max) {
                red[li] = max(red[li], red[li + s]);
            } else {
                red[li] += red[li + s];
            }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = wg.x * P.stride;
    var m = -3.4028235e38;
    for (var i = li; i < P.n; i += WG) {
        m = max(m, V[base + i]);
    }
    m = reduce(li, m, true);
    var l = 0.0;
    for (var i = li; i < P.n; i += WG) {
        let p = exp(V[base + i] - m);
        V[base + i] = p;
        l += p;
    }
    l = reduce(li, l, false);
    for (var i = li; i < P.n; i += WG) {
        V[base + i] = V[base + i] / l;
    }
}
