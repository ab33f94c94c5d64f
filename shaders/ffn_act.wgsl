// The FFN's hidden activation, in place in U: KIND 0 (SwiGLU) u = u * silu(g), KIND 1 (ReLU,
// OPT) u = max(u, 0). silu(x) = x / (1 + exp(-x)), the CPU formula.

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override KIND: u32 = 0u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> G: array<f32>;
@group(0) @binding(2) var<storage, read_write> U: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.z * P.n + gid.x;
    if (gid.x >= P.n) {
        return;
    }
    if (KIND == 0u) {
        let g = G[i];
        U[i] = U[i] * (g / (1.0 + exp(-g)));
    } else {
        U[i] = max(U[i], 0.0);
    }
}
