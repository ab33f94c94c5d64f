//! The WGSL sources, one file per kernel under `shaders/`, embedded at compile time. Kernels that
//! read raw ggml blocks get the shared library files (`shaders/lib/`) prepended: WGSL has no
//! include, and module-scope declarations may be used before they appear, so the library can
//! name the kernel's `W` and `X` bindings.
//!
//! f16 values are read one of two ways ([`Half`]), chosen per device:
//! - **packed**: two f16 per `u32`, converted with `unpack2x16float`/`pack2x16float`, which
//!   every wgpu backend supports;
//! - **native**: through `array<f16>` views of the same buffers (WGSL's `enable f16`, the
//!   SHADER_F16 feature), so each f16 is one 16-bit load or store.
//!
//! WGSL has no conditional compilation, so a line that belongs to one form only starts with
//! `//@packed ` or `//@native `: [`source`] keeps the chosen form's lines (without the marker)
//! and drops the other's. The native views live in bind group 1, one per buffer that has one
//! ([`f16_views`] names which of group 0's buffers, in order), so group 0 is the same in both.

const QUANT: &str = include_str!("../../../shaders/lib/quant.wgsl");
const DOT: &str = include_str!("../../../shaders/lib/dot.wgsl");

/// Storage buffers the native form's busiest kernel binds in one stage (the sparse FFN's seven
/// and its weights' f16 view), checked against every kernel by a test. WebGPU's default limit
/// is 8, so a device must allow this many for the native form.
pub const NATIVE_STORAGE_BUFFERS: u32 = 8;

/// How shaders read and write f16 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    /// Two f16 in a `u32`, packed and unpacked in registers: no adapter feature needed.
    Packed,
    /// `array<f16>` views of the same buffers: needs the device's SHADER_F16 feature.
    Native,
}

impl Half {
    pub fn name(self) -> &'static str {
        match self {
            Half::Packed => "packed",
            Half::Native => "native",
        }
    }
}

/// The shared library files a kernel needs in front of its own source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lib {
    None,
    /// `quant.wgsl`: raw block reads and `w_value` (needs `W`, and in the native form its f16
    /// view `W_H` at group 1, binding 0).
    Quant,
    /// `quant.wgsl` and `dot.wgsl`: row dot products (needs `W` and `X`).
    Dot,
}

/// One kernel: its name, its own file, the library it needs, and the group-0 bindings that get
/// an `array<f16>` view in group 1 in the native form (view i at binding i).
struct Source {
    name: &'static str,
    own: &'static str,
    lib: Lib,
    f16_views: &'static [u32],
}

const fn kernel(
    name: &'static str,
    own: &'static str,
    lib: Lib,
    f16_views: &'static [u32],
) -> Source {
    Source {
        name,
        own,
        lib,
        f16_views,
    }
}

/// Every kernel. `W` (the weights) is binding 1 wherever the library reads it.
const KERNELS: &[Source] = &[
    kernel(
        "add",
        include_str!("../../../shaders/add.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "argmax",
        include_str!("../../../shaders/argmax.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "attention",
        include_str!("../../../shaders/attention.wgsl"),
        Lib::None,
        // The key and value caches.
        &[2, 3],
    ),
    kernel(
        "embed",
        include_str!("../../../shaders/embed.wgsl"),
        Lib::Quant,
        &[1],
    ),
    kernel(
        "ffn_act",
        include_str!("../../../shaders/ffn_act.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "head_norm",
        include_str!("../../../shaders/head_norm.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "kv_store",
        include_str!("../../../shaders/kv_store.wgsl"),
        Lib::None,
        &[3, 4],
    ),
    kernel(
        "layer_norm",
        include_str!("../../../shaders/layer_norm.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "matvec",
        include_str!("../../../shaders/matvec.wgsl"),
        Lib::Dot,
        &[1],
    ),
    kernel(
        "predictor_select",
        include_str!("../../../shaders/predictor_select.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "rms_norm",
        include_str!("../../../shaders/rms_norm.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "rope",
        include_str!("../../../shaders/rope.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "softmax",
        include_str!("../../../shaders/softmax.wgsl"),
        Lib::None,
        &[],
    ),
    kernel(
        "sparse_ffn",
        include_str!("../../../shaders/sparse_ffn.wgsl"),
        Lib::Dot,
        &[1],
    ),
];

fn find(name: &str) -> Option<&'static Source> {
    KERNELS.iter().find(|k| k.name == name)
}

/// Names of every kernel.
pub fn names() -> impl Iterator<Item = &'static str> {
    KERNELS.iter().map(|k| k.name)
}

/// The group-0 bindings of kernel `name` that the native form also binds as `array<f16>` in
/// group 1 (empty for kernels that read no f16, and for unknown names).
pub fn f16_views(name: &str) -> &'static [u32] {
    find(name).map_or(&[], |k| k.f16_views)
}

/// The complete WGSL source of kernel `name` (library included) in the `half` form, or `None`
/// for an unknown name.
pub fn source(name: &str, half: Half) -> Option<String> {
    let k = find(name)?;
    let mut s = String::new();
    if half == Half::Native {
        // A directive must come before every declaration, the library's included.
        s.push_str("enable f16;\n\n");
    }
    if k.lib != Lib::None {
        push_form(&mut s, QUANT, half);
        s.push('\n');
    }
    if k.lib == Lib::Dot {
        push_form(&mut s, DOT, half);
        s.push('\n');
    }
    push_form(&mut s, k.own, half);
    Some(s)
}

const PACKED: &str = "//@packed ";
const NATIVE: &str = "//@native ";

/// Appends `text` with the lines of form `half` uncommented and the other form's lines left
/// out (as empty lines, so naga's line numbers still match the file's).
fn push_form(out: &mut String, text: &str, half: Half) {
    let (keep, drop) = match half {
        Half::Packed => (PACKED, NATIVE),
        Half::Native => (NATIVE, PACKED),
    };
    for line in text.lines() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        if let Some(code) = body.strip_prefix(keep) {
            out.push_str(indent);
            out.push_str(code);
        } else if !body.starts_with(drop) {
            out.push_str(line);
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capabilities() -> naga::valid::Capabilities {
        naga::valid::Capabilities::default()
            | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32
            | naga::valid::Capabilities::SHADER_FLOAT16
    }

    /// Parses and validates `src` with naga, as wgpu does before compiling it; no GPU needed, so a
    /// broken shader fails CI on any machine.
    fn validate(name: &str, src: &str) -> naga::Module {
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(src)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(src)));
        module
    }

    #[test]
    fn every_shader_parses_and_validates_in_both_forms() {
        for half in [Half::Packed, Half::Native] {
            for name in names() {
                let src = source(name, half).expect("listed kernel");
                let module = validate(name, &src);
                assert!(
                    module
                        .entry_points
                        .iter()
                        .any(|e| e.stage == naga::ShaderStage::Compute),
                    "{name}.wgsl has no compute entry point"
                );
            }
        }
    }

    /// The packed form must run where SHADER_F16 is absent: no f16 type anywhere in it.
    #[test]
    fn the_packed_form_needs_no_f16_feature() {
        for name in names() {
            let src = source(name, Half::Packed).expect("listed kernel");
            let module = validate(name, &src);
            let f16 = module.types.iter().any(|(_, t)| {
                matches!(
                    t.inner,
                    naga::TypeInner::Scalar(naga::Scalar {
                        kind: naga::ScalarKind::Float,
                        width: 2
                    }) | naga::TypeInner::Vector {
                        scalar: naga::Scalar {
                            kind: naga::ScalarKind::Float,
                            width: 2
                        },
                        ..
                    }
                )
            });
            assert!(!f16, "the packed form of {name}.wgsl uses f16");
        }
    }

    /// Group 1 of the native form holds exactly the views the table lists, each an f16 array,
    /// so `Kernel` binds what the shader declares.
    #[test]
    fn native_views_match_the_table() {
        for name in names() {
            let src = source(name, Half::Native).expect("listed kernel");
            let module = validate(name, &src);
            let mut views: Vec<u32> = module
                .global_variables
                .iter()
                .filter_map(|(_, g)| {
                    g.binding
                        .as_ref()
                        .filter(|b| b.group == 1)
                        .map(|b| b.binding)
                })
                .collect();
            views.sort_unstable();
            let expected: Vec<u32> = (0..f16_views(name).len() as u32).collect();
            assert_eq!(views, expected, "{name}.wgsl: group-1 bindings");
        }
    }

    /// The native form fits in [`NATIVE_STORAGE_BUFFERS`] storage buffers per kernel.
    #[test]
    fn native_kernels_fit_the_storage_buffer_count() {
        let mut most = 0;
        for name in names() {
            let module = validate(name, &source(name, Half::Native).expect("listed kernel"));
            let storage = module
                .global_variables
                .iter()
                .filter(|(_, g)| matches!(g.space, naga::AddressSpace::Storage { .. }))
                .count() as u32;
            assert!(storage <= NATIVE_STORAGE_BUFFERS, "{name}: {storage}");
            most = most.max(storage);
        }
        assert_eq!(
            most, NATIVE_STORAGE_BUFFERS,
            "the constant is larger than needed"
        );
    }

    /// A misspelt marker would silently keep a line in both forms (as a comment): refuse it.
    #[test]
    fn form_markers_are_spelt_right() {
        for k in KERNELS.iter().map(|k| k.own).chain([QUANT, DOT]) {
            for line in k.lines() {
                let body = line.trim_start();
                if body.starts_with("//@") {
                    assert!(
                        body.starts_with(PACKED) || body.starts_with(NATIVE),
                        "unknown form marker: {line}"
                    );
                }
            }
        }
    }

    #[test]
    fn forms_keep_their_own_lines() {
        let mut out = String::new();
        push_form(&mut out, "a\n    //@packed b\n//@native c\n", Half::Native);
        assert_eq!(out, "a\n\nc\n");
        out.clear();
        push_form(&mut out, "a\n    //@packed b\n//@native c\n", Half::Packed);
        assert_eq!(out, "a\n    b\n\n");
    }

    #[test]
    fn every_shader_file_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
        for entry in std::fs::read_dir(&dir).expect("shaders/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "wgsl") {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                assert!(
                    source(stem, Half::Packed).is_some(),
                    "{} is not listed in shaders.rs, so nothing validates it",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn validation_catches_a_broken_shader() {
        // The test above must be able to fail: a type error has to be reported.
        let src = source("add", Half::Packed)
            .expect("add")
            .replace("Y[i] += X[i];", "Y[i] += P;");
        let module = naga::front::wgsl::parse_str(&src);
        let failed = match module {
            Err(_) => true,
            Ok(m) => {
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities())
                    .validate(&m)
                    .is_err()
            }
        };
        assert!(failed, "a type error in a shader went unnoticed");
    }
}
