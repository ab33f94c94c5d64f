//! The WGSL sources, one file per kernel under `shaders/`, embedded at compile time. Kernels that
//! read raw ggml blocks get the shared library files (`shaders/lib/`) prepended: WGSL has no
//! include, and module-scope declarations may be used before they appear, so the library can
//! name the kernel's `W` and `X` bindings.

const QUANT: &str = include_str!("../../../shaders/lib/quant.wgsl");
const DOT: &str = include_str!("../../../shaders/lib/dot.wgsl");

/// The shared library files a kernel needs in front of its own source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lib {
    None,
    /// `quant.wgsl`: raw block reads and `w_value` (needs `W`).
    Quant,
    /// `quant.wgsl` and `dot.wgsl`: row dot products (needs `W` and `X`).
    Dot,
}

/// Every kernel: (name, its own file, the library it needs).
const KERNELS: &[(&str, &str, Lib)] = &[
    ("add", include_str!("../../../shaders/add.wgsl"), Lib::None),
    (
        "argmax",
        include_str!("../../../shaders/argmax.wgsl"),
        Lib::None,
    ),
    (
        "attention",
        include_str!("../../../shaders/attention.wgsl"),
        Lib::None,
    ),
    (
        "embed",
        include_str!("../../../shaders/embed.wgsl"),
        Lib::Quant,
    ),
    (
        "ffn_act",
        include_str!("../../../shaders/ffn_act.wgsl"),
        Lib::None,
    ),
    (
        "kv_store",
        include_str!("../../../shaders/kv_store.wgsl"),
        Lib::None,
    ),
    (
        "layer_norm",
        include_str!("../../../shaders/layer_norm.wgsl"),
        Lib::None,
    ),
    (
        "matvec",
        include_str!("../../../shaders/matvec.wgsl"),
        Lib::Dot,
    ),
    (
        "predictor_select",
        include_str!("../../../shaders/predictor_select.wgsl"),
        Lib::None,
    ),
    (
        "rms_norm",
        include_str!("../../../shaders/rms_norm.wgsl"),
        Lib::None,
    ),
    (
        "rope",
        include_str!("../../../shaders/rope.wgsl"),
        Lib::None,
    ),
    (
        "softmax",
        include_str!("../../../shaders/softmax.wgsl"),
        Lib::None,
    ),
    (
        "sparse_ffn",
        include_str!("../../../shaders/sparse_ffn.wgsl"),
        Lib::Dot,
    ),
];

/// Names of every kernel.
pub fn names() -> impl Iterator<Item = &'static str> {
    KERNELS.iter().map(|k| k.0)
}

/// The complete WGSL source of kernel `name` (library included), or `None` for an unknown name.
pub fn source(name: &str) -> Option<String> {
    let &(_, own, lib) = KERNELS.iter().find(|k| k.0 == name)?;
    let mut s = String::new();
    if lib != Lib::None {
        s.push_str(QUANT);
        s.push('\n');
    }
    if lib == Lib::Dot {
        s.push_str(DOT);
        s.push('\n');
    }
    s.push_str(own);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and validates `src` with naga, as wgpu does before compiling it; no GPU needed, so a
    /// broken shader fails CI on any machine.
    fn validate(name: &str, src: &str) -> naga::Module {
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default()
                | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(src)));
        module
    }

    #[test]
    fn every_shader_parses_and_validates() {
        for name in names() {
            let src = source(name).expect("listed kernel");
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

    #[test]
    fn every_shader_file_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
        for entry in std::fs::read_dir(&dir).expect("shaders/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "wgsl") {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                assert!(
                    source(stem).is_some(),
                    "{} is not listed in shaders.rs, so nothing validates it",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn validation_catches_a_broken_shader() {
        // The test above must be able to fail: a type error has to be reported.
        let src = source("add")
            .expect("add")
            .replace("Y[i] += X[i];", "Y[i] += P;");
        let module = naga::front::wgsl::parse_str(&src);
        let failed = match module {
            Err(_) => true,
            Ok(m) => naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::default()
                    | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
            )
            .validate(&m)
            .is_err(),
        };
        assert!(failed, "a type error in a shader went unnoticed");
    }
}
