// Index of the largest of `n` values (the first one on ties, as the CPU sampler's `argmax`;
// NaN never wins): greedy decoding reads back 4 bytes instead of the logits. One workgroup.

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> OUT: array<u32>;

const WG: u32 = 256u;
var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

// Whether (v, i) beats (bv, bi): larger, or equal and earlier. `v > bv` is false for NaN.
fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let o = wg.z * P.n;
    var bv = -3.4028235e38;
    var bi = 0xffffffffu;
    for (var i = li; i < P.n; i += WG) {
        let v = X[o + i];
        if (beats(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    best_v[li] = bv;
    best_i[li] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s && beats(best_v[li + s], best_i[li + s], best_v[li], best_i[li])) {
            best_v[li] = best_v[li + s];
            best_i[li] = best_i[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        // All values NaN or -inf: index 0, as the CPU's argmax.
        OUT[wg.z] = select(best_i[0], 0u, best_i[0] == 0xffffffffu);
    }
}
