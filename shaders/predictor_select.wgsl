// The low-rank predictor's last step: neuron i is active when its score reaches the layer's
// threshold tau (score >= tau, as `sparsity::predictor`). The heads Z = B (A h) + bias come from
// two matvecs; the score is Z[i] (FORM 0, linear) or |silu(Z[i]) * Z[n + i]| (FORM 1, product:
// estimated gate and up pre-activations). The active ids are compacted, in increasing order,
// into LIST = [count, id_0, id_1, ...]. Ordered rather than appended with an atomic counter, so
// the list, and the order in which the sparse FFN sums its neurons, is the same on every run:
// one workgroup, each invocation owns a contiguous range of neurons, and an exclusive prefix sum
// of the per-invocation counts gives each its first output slot.
// A verify pass has one column per position (workgroups along z): column c's heads at
// Z[c * heads * n], its list at LIST[c * (n + 1)].

struct Params {
    n: u32,
    threshold: f32,
    // 0: linear, 1: product.
    form: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> Z: array<f32>;
@group(0) @binding(2) var<storage, read_write> LIST: array<u32>;

const WG: u32 = 256u;
var<workgroup> scan: array<u32, 256>;

// Column c's score of neuron i (z0: the column's first head).
fn score(z0: u32, i: u32) -> f32 {
    if (P.form == 0u) {
        return Z[z0 + i];
    }
    let g = Z[z0 + i];
    return abs(g / (1.0 + exp(-g)) * Z[z0 + P.n + i]);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let z0 = wg.z * (P.form + 1u) * P.n;
    let l0 = wg.z * (P.n + 1u);
    let per = (P.n + WG - 1u) / WG;
    let first = min(li * per, P.n);
    let end = min(first + per, P.n);
    var c = 0u;
    for (var i = first; i < end; i++) {
        c += select(0u, 1u, score(z0, i) >= P.threshold);
    }
    scan[li] = c;
    workgroupBarrier();
    // Hillis-Steele inclusive scan; the read and the write of each step are split by a barrier.
    for (var s = 1u; s < WG; s <<= 1u) {
        var v = scan[li];
        if (li >= s) {
            v += scan[li - s];
        }
        workgroupBarrier();
        scan[li] = v;
        workgroupBarrier();
    }
    var at = scan[li] - c;
    for (var i = first; i < end; i++) {
        if (score(z0, i) >= P.threshold) {
            LIST[l0 + 1u + at] = i;
            at++;
        }
    }
    if (li == WG - 1u) {
        LIST[l0] = scan[WG - 1u];
    }
}
