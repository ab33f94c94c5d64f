//! The layouts of the `#[repr(C)]` structs the kernels write into uniform buffers, as the
//! compiler laid them out. `tests/wgsl_layout.rs` parses every shader with naga and checks
//! that each `var<uniform>` struct has the same named fields, at the same offsets and of the
//! same sizes, and the same total size, as the Rust struct written into it (see
//! [`uniform_layouts`]).
//!
//! Each kernel lists its struct's fields next to the definition (`params_layout`) with
//! `struct_layout!`, which destructures the struct without `..`: a field added to the struct
//! and not to the list does not compile, and offsets and sizes come from the compiler
//! (`offset_of!`, `size_of`), so the list cannot drift from the definition.

/// One field of a struct: its name, byte offset and size, and its Rust type as
/// [`std::any::type_name`] writes it (`u32`, `f32`, `[u32; 3]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldLayout {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
    pub ty: &'static str,
}

impl FieldLayout {
    /// Padding: a field whose name starts with `_`, which no side reads. Padding is matched by
    /// the total size only (Rust writes `_pad: [u32; 3]` where WGSL has `_pad0`, `_pad1`, ...).
    pub fn is_padding(&self) -> bool {
        self.name.starts_with('_')
    }
}

/// One struct: its Rust path, its size, and its fields in declaration order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructLayout {
    pub name: &'static str,
    pub size: usize,
    pub fields: Vec<FieldLayout>,
}

/// The [`StructLayout`] of struct `$ty` (a `bytemuck::Zeroable` type in scope) whose fields
/// are `$field, ...`: every field must be listed, or the destructuring does not compile.
macro_rules! struct_layout {
    ($ty:ident { $($field:ident),* $(,)? }) => {{
        let value: $ty = bytemuck::Zeroable::zeroed();
        let $ty { $($field: _),* } = value;
        $crate::backend::gpu::kernels::layout::StructLayout {
            name: concat!(module_path!(), "::", stringify!($ty)),
            size: std::mem::size_of::<$ty>(),
            fields: vec![$($crate::backend::gpu::kernels::layout::FieldLayout {
                name: stringify!($field),
                offset: std::mem::offset_of!($ty, $field),
                size: std::mem::size_of_val(&value.$field),
                ty: std::any::type_name_of_val(&value.$field),
            }),*],
        }
    }};
}
pub(crate) use struct_layout;

/// Every struct a shader reads as a uniform, with the Rust struct written into it:
/// `(kernel, WGSL struct name, Rust layout)`, kernels named as in
/// [`crate::backend::gpu::shaders`]. A kernel with a `var<uniform>` missing here fails
/// `tests/wgsl_layout.rs`, as does an entry its shader does not declare.
pub fn uniform_layouts() -> Vec<(&'static str, &'static str, StructLayout)> {
    use super::*;
    vec![
        ("add", "Params", add::params_layout()),
        ("argmax", "Params", argmax::params_layout()),
        ("attention", "Params", attention::params_layout()),
        ("attention", "Step", step_layout()),
        ("embed", "Params", embed::params_layout()),
        ("embed", "Step", step_layout()),
        ("ffn_act", "Params", ffn_act::params_layout()),
        ("head_norm", "Params", norm::params_layout()),
        ("kv_store", "Params", kv_store::params_layout()),
        ("kv_store", "Step", step_layout()),
        ("layer_norm", "Params", norm::params_layout()),
        ("matvec", "Params", matvec::params_layout()),
        ("matvec", "Step", step_layout()),
        ("predictor_select", "Params", predictor::params_layout()),
        ("rms_norm", "Params", norm::params_layout()),
        ("rope", "Params", rope::params_layout()),
        ("rope", "Step", step_layout()),
        ("softmax", "Params", softmax::params_layout()),
        ("sparse_ffn", "Params", sparse_ffn::params_layout()),
        ("sparse_ffn", "Step", step_layout()),
    ]
}
