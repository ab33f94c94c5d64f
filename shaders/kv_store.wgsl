// Appends this position's key and value (kv_dim each) to a layer's GPU-resident cache at row
// Step.pos. The cache holds f32 values, or with KV_F16 f16 values (half the memory): packed two
// to a u32 with pack2x16float in the packed form, stored through the f16 views KC_H and VC_H in
// the native form (the same bytes either way). kv_dim is even.

struct Params {
    kv_dim: u32,
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
@group(0) @binding(1) var<storage, read> K: array<f32>;
@group(0) @binding(2) var<storage, read> VAL: array<f32>;
@group(0) @binding(3) var<storage, read_write> KC: array<u32>;
@group(0) @binding(4) var<storage, read_write> VC: array<u32>;
//@native @group(1) @binding(0) var<storage, read_write> KC_H: array<f16>;
//@native @group(1) @binding(1) var<storage, read_write> VC_H: array<f16>;
@group(0) @binding(5) var<uniform> S: Step;

override KV_F16: bool = false;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    // Column c of the pass: its key and value at c * kv_dim, its cache row S.pos + c.
    let c = gid.z;
    let row = S.pos + c;
    let k = c * P.kv_dim;
    if (KV_F16) {
        // Invocation i packs values 2i and 2i + 1.
        let half_dim = P.kv_dim / 2u;
        if (i >= half_dim) {
            return;
        }
        let at = row * half_dim + i;
        //@packed KC[at] = pack2x16float(vec2<f32>(K[k + 2u * i], K[k + 2u * i + 1u]));
        //@packed VC[at] = pack2x16float(vec2<f32>(VAL[k + 2u * i], VAL[k + 2u * i + 1u]));
        //@native KC_H[2u * at] = f16(K[k + 2u * i]);
        //@native KC_H[2u * at + 1u] = f16(K[k + 2u * i + 1u]);
        //@native VC_H[2u * at] = f16(VAL[k + 2u * i]);
        //@native VC_H[2u * at + 1u] = f16(VAL[k + 2u * i + 1u]);
        return;
    }
    if (i >= P.kv_dim) {
        return;
    }
    KC[row * P.kv_dim + i] = bitcast<u32>(K[k + i]);
    VC[row * P.kv_dim + i] = bitcast<u32>(VAL[k + i]);
}
