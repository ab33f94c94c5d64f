//! The sparse FFN over bundles in window slots (shaders/sparse_ffn.wgsl): the GPU twin of
//! `backend::cpu::sparse_ffn`, reading the flash image's bundle layout unchanged.

use super::layout::{struct_layout, StructLayout};
use super::{aligned, code, need, Columns, Dispatch, Step, Width};
use crate::backend::cpu::sparse_ffn::{BundleParts, Part};
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::{grid, Binding};
use crate::backend::gpu::{GpuContext, GpuError};
use crate::model::config::FfnKind;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    stride: u32,
    gate_offset: u32,
    up_offset: u32,
    down_offset: u32,
    d: u32,
    flags: u32,
    groups_x: u32,
    act_stride: u32,
}

/// [`Params`] as laid out, checked against `shaders/sparse_ffn.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params {
        stride,
        gate_offset,
        up_offset,
        down_offset,
        d,
        flags,
        groups_x,
        act_stride
    })
}

/// Columns a sparse FFN workgroup takes (`COLS` in shaders/sparse_ffn.wgsl).
pub const COLUMNS_PER_GROUP: u32 = 8;

/// The buffers and shape of one layer's sparse FFN.
pub struct SparseFfnArgs<'a> {
    /// The bundle layout (the image's `[gate | up | down]` or `[up | down]`).
    pub parts: BundleParts,
    /// Bytes from one slot to the next (the image's bundle stride).
    pub stride: usize,
    /// The hidden size.
    pub d: usize,
    /// The window: `n_slots` bundles back to back.
    pub slots: &'a wgpu::Buffer,
    pub n_slots: usize,
    /// The normed input h (d values per column).
    pub h: &'a wgpu::Buffer,
    /// `[count, id_0, id_1, ...]` with room for `1 + max_active` values: one list for every
    /// column of a pass (a verify pass: the union of its positions' active sets).
    pub active: &'a wgpu::Buffer,
    pub max_active: usize,
    /// `map[k]` = slot of the k-th active neuron; `None`: slot = id (all neurons resident).
    pub map: Option<&'a wgpu::Buffer>,
    /// The map holds, after its `count` slots, one mask per list entry: bit c set when column c
    /// computes that neuron (room for `2 * max_active` values). Without masks every column
    /// computes every listed neuron.
    pub masked: bool,
    /// Where the pass's column count comes from, and the most columns it may have.
    pub width: Width<'a>,
    pub columns: usize,
    /// Per-neuron bias added to `up . h` (ReLU models), indexed by id.
    pub up_bias: Option<&'a wgpu::Buffer>,
    /// Scratch for the activations (max_active values per column).
    pub act: &'a wgpu::Buffer,
    /// The result (d values per column).
    pub out: &'a wgpu::Buffer,
}

fn check_part(p: &Part, d: usize, stride: usize, role: &str) -> Result<u32, GpuError> {
    let dt = code(p.dtype, &format!("the bundle's {role} part"))?;
    if p.dtype.bytes_for(d) != Some(p.len)
        || p.offset + p.len > stride
        || !p.offset.is_multiple_of(2)
    {
        return Err(GpuError::Shape(format!(
            "bundle {role} part: {} bytes at {} in a {stride}-byte bundle is not {d} {} values at an even offset",
            p.len, p.offset, p.dtype
        )));
    }
    Ok(dt)
}

/// Two dispatches: the active neurons' activations, then `out = sum_k a_k down_k` in list order,
/// for each column of the pass.
pub fn sparse_ffn(ctx: &GpuContext, a: &SparseFfnArgs) -> Result<Vec<Dispatch>, GpuError> {
    let columns = a.columns.max(1);
    if a.masked && (a.map.is_none() || columns > 32) {
        return Err(GpuError::Shape(format!(
            "column masks need a slot map and at most 32 columns (one bit each), got {columns}"
        )));
    }
    let p = &a.parts;
    if !a.stride.is_multiple_of(2) {
        return Err(GpuError::Shape(format!(
            "bundle stride {} is odd; the kernels read bundles at even offsets",
            a.stride
        )));
    }
    let up = check_part(&p.up, a.d, a.stride, "up")?;
    let down = check_part(&p.down, a.d, a.stride, "down")?;
    let (kind, gate, gate_offset) = match (p.kind, &p.gate) {
        (FfnKind::SwiGlu, Some(g)) => (0.0, check_part(g, a.d, a.stride, "gate")?, g.offset),
        (FfnKind::SwiGlu, None) => {
            return Err(GpuError::Shape(
                "a SwiGLU bundle needs a gate part".to_string(),
            ))
        }
        (FfnKind::Relu, _) => (1.0, up, 0),
        (FfnKind::GeGlu, _) => return Err(super::ffn_act::geglu_unsupported()),
    };
    need(a.slots, a.n_slots * a.stride / 4, "window slots")?;
    need(a.h, a.d * columns, "sparse FFN input")?;
    need(a.out, a.d * columns, "sparse FFN output")?;
    need(a.active, 1 + a.max_active, "active list")?;
    need(a.act, a.max_active * columns, "activation scratch")?;
    if let Some(m) = a.map {
        let per = if a.masked { 2 } else { 1 };
        need(m, per * a.max_active, "slot map")?;
    }
    let all_aligned = [Some(&p.up), Some(&p.down), p.gate.as_ref()]
        .into_iter()
        .flatten()
        .all(|part| aligned(part.dtype, a.d, part.offset, a.stride));
    let bindings = [
        Binding::Uniform,
        Binding::Read,
        Binding::Read,
        Binding::Read,
        Binding::Read,
        Binding::Read,
        Binding::ReadWrite,
        Binding::ReadWrite,
        Binding::Uniform,
    ];
    let constants = [
        ("GATE_DTYPE", gate as f64),
        ("UP_DTYPE", up as f64),
        ("DOWN_DTYPE", down as f64),
        ("KIND", kind),
        ("LANES", ctx.tuning.lanes as f64),
        ("ALIGNED", all_aligned as u32 as f64),
    ];
    let act_k = ctx.kernel("sparse_ffn", "activations", &bindings, &constants)?;
    let acc_k = ctx.kernel("sparse_ffn", "accumulate", &bindings, &constants)?;
    let groups = grid(
        ctx,
        a.max_active.div_ceil(64 / ctx.tuning.lanes as usize) as u32,
    );
    let params = uniform(
        ctx,
        "sparse_ffn",
        &Params {
            stride: a.stride as u32,
            gate_offset: gate_offset as u32,
            up_offset: p.up.offset as u32,
            down_offset: p.down.offset as u32,
            d: a.d as u32,
            flags: a.map.is_none() as u32
                | (a.up_bias.is_some() as u32) << 1
                | (a.masked as u32) << 2,
            groups_x: groups[0],
            act_stride: a.max_active as u32,
        },
    );
    let one;
    let step = match a.width {
        Width::One => {
            one = uniform(ctx, "one column", &Step::default());
            &one
        }
        Width::Step(s) => s,
    };
    // Unused optional bindings get a stand-in the shader never reads (flags say so).
    let buffers = [
        &params,
        a.slots,
        a.h,
        a.active,
        a.map.unwrap_or(a.active),
        a.up_bias.unwrap_or(a.h),
        a.act,
        a.out,
        step,
    ];
    let blocks = Columns::Blocks(COLUMNS_PER_GROUP);
    Ok(vec![
        act_k.dispatch(ctx, &buffers, groups)?.with_columns(blocks),
        acc_k
            .dispatch(ctx, &buffers, [a.d.div_ceil(64).max(1) as u32, 1, 1])?
            .with_columns(blocks),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::buffers::{read, storage_bytes, storage_f32, storage_zeroed};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{forms, max_rel_err, Rng};
    use crate::backend::gpu::GpuContext;
    use crate::image::{BundleLayout, PartRole};
    use crate::quant;
    use crate::quant::DType;

    fn part_of(layout: &BundleLayout, role: PartRole) -> Option<Part> {
        layout.part(role).map(|p| Part {
            dtype: p.dtype,
            offset: p.offset,
            len: p.len,
        })
    }

    /// Writes `n` random neurons as bundles in the image's layout (built by `BundleLayout::new`,
    /// as `convert` does), scatters them over slots, activates a subset, and compares the GPU
    /// result with the sum over the dequantised parts in f64.
    fn check(kind: FfnKind, dtypes: &[DType], d: usize, identity: bool, with_bias: bool) {
        // Both work splits (see matvec's tests), both f16 forms.
        for form in forms() {
            for lanes in [16, 1] {
                check_with(&form, kind, dtypes, d, identity, with_bias, lanes);
            }
        }
    }

    fn check_with(
        form: &GpuContext,
        kind: FfnKind,
        dtypes: &[DType],
        d: usize,
        identity: bool,
        with_bias: bool,
        lanes: u32,
    ) {
        let mut ctx = form.clone();
        ctx.tuning.lanes = lanes;
        let ctx = &ctx;
        let mut rng = Rng::new(d as u64 + dtypes.len() as u64);
        let n = 200;
        let roles: Vec<PartRole> = match kind {
            FfnKind::SwiGlu => vec![PartRole::Gate, PartRole::Up, PartRole::Down],
            FfnKind::Relu => vec![PartRole::Up, PartRole::Down],
            FfnKind::GeGlu => unreachable!("the GPU kernels refuse GeGLU"),
        };
        let spec: Vec<(PartRole, DType)> =
            roles.iter().copied().zip(dtypes.iter().copied()).collect();
        let layout = BundleLayout::new(&spec, d).unwrap();
        layout.check(kind, d).unwrap();
        let parts = BundleParts {
            kind,
            gate: part_of(&layout, PartRole::Gate),
            up: part_of(&layout, PartRole::Up).unwrap(),
            down: part_of(&layout, PartRole::Down).unwrap(),
        };
        // Neuron i lives in slot perm[i] (identity: slot i).
        let mut perm: Vec<usize> = (0..n).collect();
        if !identity {
            for i in (1..n).rev() {
                perm.swap(i, rng.below(i + 1));
            }
        }
        let mut slots = vec![0u8; n * layout.stride];
        let mut deq: Vec<Vec<Vec<f32>>> = Vec::new(); // [neuron][part] values
        for &slot in perm.iter() {
            let mut vals = Vec::new();
            for p in &layout.parts {
                let mut bytes = Vec::new();
                quant::quantize(p.dtype, &rng.vec(d, 0.5), &mut bytes).unwrap();
                slots[slot * layout.stride + p.offset..][..p.len].copy_from_slice(&bytes);
                let mut v = vec![0.0; d];
                quant::dequantize(p.dtype, &bytes, &mut v).unwrap();
                vals.push(v);
            }
            deq.push(vals);
        }
        let h = rng.vec(d, 1.0);
        let bias = rng.vec(n, 0.5);
        let active: Vec<u32> = (0..n as u32).filter(|_| rng.below(3) != 0).collect();
        let mut map: Vec<u32> = active.iter().map(|&i| perm[i as usize] as u32).collect();
        map.resize(n, 0);
        let mut list = vec![active.len() as u32];
        list.extend(&active);
        list.resize(n + 1, 0);
        let bs = storage_bytes(ctx, "slots", &slots).unwrap();
        let bh = storage_f32(ctx, "h", &h).unwrap();
        let bl = storage_bytes(ctx, "list", bytemuck::cast_slice(&list)).unwrap();
        let bm = storage_bytes(ctx, "map", bytemuck::cast_slice(&map)).unwrap();
        let bb = storage_f32(ctx, "bias", &bias).unwrap();
        let act = storage_zeroed(ctx, "act", (n * 4) as u64).unwrap();
        let out = storage_f32(ctx, "out", &vec![f32::NAN; d]).unwrap();
        let args = SparseFfnArgs {
            parts,
            stride: layout.stride,
            d,
            slots: &bs,
            n_slots: n,
            h: &bh,
            active: &bl,
            max_active: n,
            map: (!identity).then_some(&bm),
            masked: false,
            width: Width::One,
            columns: 1,
            up_bias: with_bias.then_some(&bb),
            act: &act,
            out: &out,
        };
        submit(ctx, &sparse_ffn(ctx, &args).unwrap());
        let got: Vec<f32> = read(ctx, &out, d).unwrap();
        let dot = |w: &[f32]| {
            w.iter()
                .zip(&h)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
        };
        let mut want = vec![0f64; d];
        for &i in &active {
            let v = &deq[i as usize];
            let a = match kind {
                FfnKind::SwiGlu => {
                    let g = dot(&v[0]);
                    g / (1.0 + (-g).exp()) * dot(&v[1])
                }
                FfnKind::GeGlu => unreachable!("the GPU kernels refuse GeGLU"),
                FfnKind::Relu => {
                    let b = if with_bias {
                        bias[i as usize] as f64
                    } else {
                        0.0
                    };
                    (dot(&v[0]) + b).max(0.0)
                }
            };
            let down = v.last().expect("down part");
            for (o, &w) in want.iter_mut().zip(down) {
                *o += a * w as f64;
            }
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        // f32 dots of d terms, then a sum of ~130 products: 1e-5 of the largest output.
        let err = max_rel_err(&got, &want, 1e-3);
        assert!(
            err < 1e-5,
            "{kind:?} {dtypes:?} lanes {lanes}: relative error {err:e}"
        );
    }

    #[test]
    fn smollm2_bundles_in_shuffled_slots() {
        // The image's default for SmolLM2: gate and up Q4_1 as in the GGUF, down requantised to
        // Q8_0. d = 96 makes the stride 222 bytes, so every other slot starts 2 mod 4.
        check(
            FfnKind::SwiGlu,
            &[DType::Q4_1, DType::Q4_1, DType::Q8_0],
            96,
            false,
            false,
        );
    }

    #[test]
    fn f16_and_q8_bundles() {
        check(FfnKind::SwiGlu, &[DType::F16; 3], 64, false, false);
        check(FfnKind::SwiGlu, &[DType::Q8_0; 3], 64, true, false);
    }

    #[test]
    fn relu_bundles_with_bias_resident_in_order() {
        check(FfnKind::Relu, &[DType::F16, DType::F16], 64, true, true);
        check(FfnKind::Relu, &[DType::Q8_0, DType::Q8_0], 96, false, true);
    }
}
