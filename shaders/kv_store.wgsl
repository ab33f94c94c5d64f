// Appends this position's key and value (kv_dim each) to a layer's GPU-resident cache at row
// Step.pos.

struct Params {
    kv_dim: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Step {
    pos: u32,
    n_pos: u32,
    token_row: u32,
    pos_row: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> K: array<f32>;
@group(0) @binding(2) var<storage, read> VAL: array<f32>;
@group(0) @binding(3) var<storage, read_write> KC: array<f32>;
@group(0) @binding(4) var<storage, read_write> VC: array<f32>;
@group(0) @binding(5) var<uniform> S: Step;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= P.kv_dim) {
        return;
    }
    KC[S.pos * P.kv_dim + i] = K[i];
    VC[S.pos * P.kv_dim + i] = VAL[i];
}
