// Dot products of weight rows (raw ggml blocks in `W`, see quant.wgsl) with an f32 vector `X`
// (declared by the including kernel). A row is cut into units: one block for the quantised
// dtypes, 8 values for the float ones; lanes of a workgroup take units in turn. Activations stay
// f32 (the CPU quantises them to Q8 first): the GPU result is the exact dot of the dequantised
// row, to f32 rounding. A K-quant unit is one sub-block of 32 values (8 per 256-value block).

// Values per unit.
fn unit_len(dt: u32) -> u32 {
    if (dt <= DT_BF16) {
        return 8u;
    }
    return 32u;
}

fn x4(at: u32) -> vec4<f32> {
    return vec4<f32>(X[at], X[at + 1u], X[at + 2u], X[at + 3u]);
}

fn i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(f32(i8_of(w, 0u)), f32(i8_of(w, 1u)), f32(i8_of(w, 2u)), f32(i8_of(w, 3u)));
}

// Nibbles of bytes 0..3 of `w` (low nibbles when `hi` is false).
fn nib4(w: u32, hi: bool) -> vec4<f32> {
    let s = select(0u, 4u, hi);
    return vec4<f32>(
        f32((w >> s) & 15u),
        f32((w >> (8u + s)) & 15u),
        f32((w >> (16u + s)) & 15u),
        f32((w >> (24u + s)) & 15u)
    );
}

// Dot of unit `u` of the row starting at byte `row` with X[x0 + u * unit_len ..].
fn dot_unit(dt: u32, row: u32, u: u32, x0: u32) -> f32 {
    let xs = x0 + u * unit_len(dt);
    switch dt {
        case 0u: {
            let b = row + u * 32u;
            let a = vec4<f32>(bitcast<f32>(w_u32(b)), bitcast<f32>(w_u32(b + 4u)),
                              bitcast<f32>(w_u32(b + 8u)), bitcast<f32>(w_u32(b + 12u)));
            let c = vec4<f32>(bitcast<f32>(w_u32(b + 16u)), bitcast<f32>(w_u32(b + 20u)),
                              bitcast<f32>(w_u32(b + 24u)), bitcast<f32>(w_u32(b + 28u)));
            return dot(a, x4(xs)) + dot(c, x4(xs + 4u));
        }
        case 1u: {
            let b = row + u * 16u;
            let p0 = w_f16x2(b);
            let p1 = w_f16x2(b + 4u);
            let p2 = w_f16x2(b + 8u);
            let p3 = w_f16x2(b + 12u);
            return dot(vec4<f32>(p0, p1), x4(xs)) + dot(vec4<f32>(p2, p3), x4(xs + 4u));
        }
        case 2u: {
            let b = row + u * 16u;
            var acc = 0.0;
            for (var k = 0u; k < 4u; k++) {
                let w = w_u32(b + 4u * k);
                let v = vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
                acc += dot(v, vec2<f32>(X[xs + 2u * k], X[xs + 2u * k + 1u]));
            }
            return acc;
        }
        case 3u: {
            let blk = row + u * 18u;
            var acc = 0.0;
            for (var k = 0u; k < 4u; k++) {
                let w = w_u32(blk + 2u + 4u * k);
                acc += dot(nib4(w, false) - vec4<f32>(8.0), x4(xs + 4u * k));
                acc += dot(nib4(w, true) - vec4<f32>(8.0), x4(xs + 16u + 4u * k));
            }
            return acc * w_f16(blk);
        }
        case 4u: {
            // sum((q d + m) x) = d sum(q x) + m sum(x).
            let blk = row + u * 20u;
            let dm = w_f16x2(blk);
            var qx = 0.0;
            var sx = 0.0;
            for (var k = 0u; k < 4u; k++) {
                let w = w_u32(blk + 4u + 4u * k);
                let lo = x4(xs + 4u * k);
                let hi = x4(xs + 16u + 4u * k);
                qx += dot(nib4(w, false), lo) + dot(nib4(w, true), hi);
                sx += dot(lo, vec4<f32>(1.0)) + dot(hi, vec4<f32>(1.0));
            }
            return dm.x * qx + dm.y * sx;
        }
        case 6u: {
            // Q4_K sub-block s of block u / 8: sum((d sc q - dmin m) x) = d sc sum(q x)
            // - dmin m sum(x).
            let blk = row + (u / 8u) * 144u;
            let s = u % 8u;
            let dm = w_f16x2(blk);
            let sm = q4k_scale_min(blk, s);
            let qs = blk + 16u + 32u * (s / 2u);
            let hi = (s & 1u) == 1u;
            var qx = 0.0;
            var sx = 0.0;
            for (var k = 0u; k < 8u; k++) {
                let x = x4(xs + 4u * k);
                qx += dot(nib4(w_u32(qs + 4u * k), hi), x);
                sx += dot(x, vec4<f32>(1.0));
            }
            return dm.x * sm.x * qx - dm.y * sm.y * sx;
        }
        case 7u: {
            // Q6_K quarter qq of half n of block u / 8 (see w_value): two scales, one per 16.
            let blk = row + (u / 8u) * 210u;
            let n = (u % 8u) / 4u;
            let qq = u % 4u;
            let ql = blk + 64u * n + 32u * (qq & 1u);
            let qh = blk + 128u + 32u * n;
            var acc = vec2<f32>(0.0);
            for (var k = 0u; k < 8u; k++) {
                let lo = nib4(w_u32(ql + 4u * k), qq >= 2u);
                let h = w_u32(qh + 4u * k) >> (2u * qq);
                let top = vec4<f32>(f32(h & 3u), f32((h >> 8u) & 3u), f32((h >> 16u) & 3u),
                                    f32((h >> 24u) & 3u));
                let d = dot(lo + 16.0 * top - vec4<f32>(32.0), x4(xs + 4u * k));
                if (k < 4u) {
                    acc.x += d;
                } else {
                    acc.y += d;
                }
            }
            let sc = blk + 192u + 8u * n + 2u * qq;
            return w_f16(blk + 208u) * (w_i8(sc) * acc.x + w_i8(sc + 1u) * acc.y);
        }
        default: {
            let blk = row + u * 34u;
            var acc = 0.0;
            for (var k = 0u; k < 8u; k++) {
                acc += dot(i8x4(w_u32(blk + 2u + 4u * k)), x4(xs + 4u * k));
            }
            return acc * w_f16(blk);
        }
    }
}

// Dot of a whole row of `cols` values with X[x0..]: lanes `lane` of `lanes` take units in turn,
// and lane 0 also takes a float row's tail (cols not a multiple of 8). The caller sums lanes.
fn dot_row_part(dt: u32, row: u32, cols: u32, x0: u32, lane: u32, lanes: u32) -> f32 {
    let n = unit_len(dt);
    let units = cols / n;
    var acc = 0.0;
    for (var u = lane; u < units; u += lanes) {
        acc += dot_unit(dt, row, u, x0);
    }
    if (lane == 0u) {
        for (var j = units * n; j < cols; j++) {
            acc += w_value(dt, row, j) * X[x0 + j];
        }
    }
    return acc;
}
