// The sparse FFN over neuron bundles held in window slots (SLOTS: n_slots bundles of `stride`
// bytes, each [gate_i | up_i | down_i] for SwiGLU or [up_i | down_i] for ReLU, the flash image's
// layout, in the parts' own dtypes), for the active neurons ACTIVE = [count, id_0, id_1, ...]:
//   out = sum_k a_k * down_{id_k},  a_k = silu(gate_k . h) * (up_k . h)  or  relu(up_k . h + b_id)
// MAP[k] is the slot holding the k-th active neuron (bit 0 of flags: slot = id, every neuron
// resident in slot order). Two entry points: `activations` (a_k into ACT; 64 / LANES neurons per
// workgroup, LANES invocations per neuron, dispatched for the largest possible count, the extra
// workgroups exit) and `accumulate` (one invocation per output value, summing in list order, so
// the result does not depend on scheduling). Uses lib/quant.wgsl and lib/dot.wgsl (X = h).
//
// Columns (a verify pass's positions, S.n_cols of them; workgroups along z take COLS each): h_c
// at X[c * d], a_c at ACT[c * act_stride], out_c at OUT[c * d]. The list is the union of the
// columns' active sets; with bit 2 of flags, MAP[count + k] has bit c set when column c computes
// the k-th neuron, and the others get a = 0, which `accumulate` skips. So each column sums its own
// neurons in list order, as a single column with only its own list would, to the bit; and each
// bundle is fetched once for all the columns of a workgroup.

struct Params {
    stride: u32,
    gate_offset: u32,
    up_offset: u32,
    down_offset: u32,
    // Hidden size: the length of h, of each part, and of out.
    d: u32,
    // Bit 0: identity slot map. Bit 1: add UP_BIAS[id] (ReLU models). Bit 2: column masks follow
    // the slot map.
    flags: u32,
    groups_x: u32,
    // Values between one column's activations and the next's (the most neurons a list holds).
    act_stride: u32,
}

struct Step {
    pos: u32,
    n_pos: u32,
    n_cols: u32,
    pos_row: u32,
}

override GATE_DTYPE: u32 = 0u;
override UP_DTYPE: u32 = 0u;
override DOWN_DTYPE: u32 = 0u;
// 0: SwiGLU, 1: ReLU.
override KIND: u32 = 0u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read> ACTIVE: array<u32>;
@group(0) @binding(4) var<storage, read> MAP: array<u32>;
@group(0) @binding(5) var<storage, read> UP_BIAS: array<f32>;
@group(0) @binding(6) var<storage, read_write> ACT: array<f32>;
@group(0) @binding(7) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(8) var<uniform> S: Step;

// Columns per workgroup (as matvec.wgsl).
const COLS: u32 = 8u;

// Invocations per neuron, a power of two dividing 64 (see matvec.wgsl).
override LANES: u32 = 16u;

var<workgroup> part_g: array<f32, 64>;
var<workgroup> part_u: array<f32, 64>;

fn slot_of(k: u32) -> u32 {
    if ((P.flags & 1u) != 0u) {
        return ACTIVE[1u + k];
    }
    return MAP[k];
}

// Whether column c computes the k-th neuron of a list of `count`.
fn member(k: u32, count: u32, c: u32) -> bool {
    if ((P.flags & 4u) == 0u) {
        return true;
    }
    return ((MAP[count + k] >> c) & 1u) != 0u;
}

@compute @workgroup_size(64)
fn activations(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let k = (wg.x + wg.y * P.groups_x) * (64u / LANES) + li / LANES;
    let lane = li % LANES;
    let count = ACTIVE[0];
    let live = k < count;
    var base = 0u;
    if (live) {
        base = slot_of(k) * P.stride;
    }
    let c0 = wg.z * COLS;
    let c1 = min(c0 + COLS, S.n_cols);
    for (var c = c0; c < c1; c++) {
        let on = live && member(k, count, c);
        var g = 0.0;
        var u = 0.0;
        if (on) {
            u = dot_row_part(UP_DTYPE, base + P.up_offset, P.d, c * P.d, lane, LANES);
            if (KIND == 0u) {
                g = dot_row_part(GATE_DTYPE, base + P.gate_offset, P.d, c * P.d, lane, LANES);
            }
        }
        let at = c * P.act_stride + k;
        if (LANES == 1u) {
            if (live) {
                ACT[at] = select(0.0, activation(k, g, u), on);
            }
            continue;
        }
        part_g[li] = g;
        part_u[li] = u;
        workgroupBarrier();
        for (var s = LANES / 2u; s > 0u; s >>= 1u) {
            if (lane < s) {
                part_g[li] += part_g[li + s];
                part_u[li] += part_u[li + s];
            }
            workgroupBarrier();
        }
        if (lane == 0u && live) {
            ACT[at] = select(0.0, activation(k, part_g[li], part_u[li]), on);
        }
    }
}

// a_k from the dots g = gate . h and u = up . h.
fn activation(k: u32, g: f32, u: f32) -> f32 {
    if (KIND == 0u) {
        return (g / (1.0 + exp(-g))) * u;
    }
    var a = u;
    if ((P.flags & 2u) != 0u) {
        a += UP_BIAS[ACTIVE[1u + k]];
    }
    return max(a, 0.0);
}

@compute @workgroup_size(64)
fn accumulate(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= P.d) {
        return;
    }
    let count = ACTIVE[0];
    let c0 = gid.z * COLS;
    let n = min(c0 + COLS, S.n_cols) - c0;
    // One sum per column, each in list order; a down value is read once for all of them.
    var acc: array<f32, COLS>;
    for (var k = 0u; k < count; k++) {
        var w = 0.0;
        var have = false;
        for (var i = 0u; i < n; i++) {
            let a = ACT[(c0 + i) * P.act_stride + k];
            if (a != 0.0) {
                if (!have) {
                    w = w_value(DOWN_DTYPE, slot_of(k) * P.stride + P.down_offset, j);
                    have = true;
                }
                acc[i] += a * w;
            }
        }
    }
    for (var i = 0u; i < n; i++) {
        OUT[(c0 + i) * P.d + j] = acc[i];
    }
}
