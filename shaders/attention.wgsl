// Causal attention of one new token over a GPU-resident KV cache, grouped-query aware:
// out_h = softmax(q_h . K_g^T * scale) V_g over positions 0..Step.n_pos, g = h / (n_heads /
// n_kv_heads). One workgroup per query head; workgroups along z take the pass's columns, column
// c being the token at S.pos + c, which attends over positions 0..S.n_pos + c (its own
// included: the pass's kv_store has written every column's row first). The scores live in a
// global scratch row per head and column (the context can outgrow workgroup memory); each
// phase's writes are made visible to the
// whole workgroup by a storage barrier. Probabilities are normalised before the weighted sum,
// as the CPU reference does. The cache holds f32 values, or with KV_F16 f16 values two to a
// u32, read through the f16 views KC_H and VC_H in the native form (see kv_store.wgsl); either
// way the arithmetic is f32.

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    // Scratch row length per head: the cache capacity.
    max_ctx: u32,
    scale: f32,
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

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(2) var<storage, read> KC: array<u32>;
@group(0) @binding(3) var<storage, read> VC: array<u32>;
@group(0) @binding(4) var<storage, read_write> SCORES: array<f32>;
@group(0) @binding(5) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(6) var<uniform> S: Step;
//@native @group(1) @binding(0) var<storage, read> KC_H: array<f16>;
//@native @group(1) @binding(1) var<storage, read> VC_H: array<f16>;

override KV_F16: bool = false;

// Value i of the key cache, and of the value cache.
fn key(i: u32) -> f32 {
    if (KV_F16) {
        //@packed return unpack2x16float(KC[i >> 1u])[i & 1u];
        //@native return f32(KC_H[i]);
    }
    return bitcast<f32>(KC[i]);
}

fn value(i: u32) -> f32 {
    if (KV_F16) {
        //@packed return unpack2x16float(VC[i >> 1u])[i & 1u];
        //@native return f32(VC_H[i]);
    }
    return bitcast<f32>(VC[i]);
}

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

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

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let c = wg.z;
    let hd = P.head_dim;
    let kv_dim = P.n_kv_heads * hd;
    let g = h / (P.n_heads / P.n_kv_heads);
    let q0 = (c * P.n_heads + h) * hd;
    let k0 = g * hd;
    let row = (c * P.n_heads + h) * P.max_ctx;
    let n = S.n_pos + c;

    var m = -3.4028235e38;
    for (var t = li; t < n; t += WG) {
        var s = 0.0;
        for (var d = 0u; d < hd; d++) {
            s += Q[q0 + d] * key(t * kv_dim + k0 + d);
        }
        s *= P.scale;
        SCORES[row + t] = s;
        m = max(m, s);
    }
    m = reduce(li, m, true);

    var l = 0.0;
    for (var t = li; t < n; t += WG) {
        let p = exp(SCORES[row + t] - m);
        SCORES[row + t] = p;
        l += p;
    }
    l = reduce(li, l, false);
    // Each thread normalises the scores it wrote itself, so no barrier is needed before this.
    for (var t = li; t < n; t += WG) {
        SCORES[row + t] = SCORES[row + t] / l;
    }
    storageBarrier();

    for (var d = li; d < hd; d += WG) {
        var acc = 0.0;
        for (var t = 0u; t < n; t++) {
            acc += SCORES[row + t] * value(t * kv_dim + k0 + d);
        }
        OUT[q0 + d] = acc;
    }
}
