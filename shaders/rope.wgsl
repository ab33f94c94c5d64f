// Rotary position embedding, in place, on a vector of heads of `head_dim`, at position Step.pos.
// The (cos, sin) of every position and pair comes from a table the CPU filled with the CPU
// reference's own f32 arithmetic: a GPU `sin` of a large angle (pos * freq reaches thousands of
// radians) is far less accurate than the CPU's, and the table makes both backends agree exactly.
// STYLE 0 pairs (2i, 2i+1) (ggml normal mode), STYLE 1 pairs (i, i + head_dim/2) (NEOX, HF).

struct Params {
    n_heads: u32,
    head_dim: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Step {
    pos: u32,
    n_pos: u32,
    n_cols: u32,
    pos_row: u32,
}

override STYLE: u32 = 0u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> TABLE: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> V: array<f32>;
@group(0) @binding(3) var<uniform> S: Step;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = P.head_dim / 2u;
    let t = gid.x;
    let c = gid.z;
    if (t >= P.n_heads * half) {
        return;
    }
    let head = t / half;
    let i = t % half;
    let o = c * P.n_heads * P.head_dim;
    var a = o + head * P.head_dim + 2u * i;
    var b = a + 1u;
    if (STYLE == 1u) {
        a = o + head * P.head_dim + i;
        b = a + half;
    }
    let cs = TABLE[(S.pos + c) * half + i];
    let x0 = V[a];
    let x1 = V[b];
    V[a] = x0 * cs.x - x1 * cs.y;
    V[b] = x0 * cs.y + x1 * cs.x;
}
