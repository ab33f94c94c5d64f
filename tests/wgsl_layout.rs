//! Every struct a shader reads from a uniform buffer has the layout of the Rust `#[repr(C)]`
//! struct the kernel writes into it: the same named fields, in the same order, at the same
//! offsets, of the same sizes and scalar types, and the same total size. A field added,
//! removed, renamed, retyped or reordered on one side only fails here, with no GPU needed,
//! instead of feeding the shader shifted values.
//!
//! The shaders are parsed with naga in both f16 forms, exactly as the library builds them
//! ([`shaders::source`]); naga computes the WGSL offsets and sizes. The Rust layouts come from
//! [`uniform_layouts`], which each kernel derives from its struct's definition (`offset_of!`,
//! `size_of`). Padding (fields named `_...`) is matched through the total size only: Rust
//! writes `_pad: [u32; 3]` where WGSL spells out `_pad0`, `_pad1`, `_pad2`.
//!
//! Storage buffers hold arrays of scalars or vectors; a storage struct would need a Rust
//! counterpart too, so one is refused until it is listed.

use llmflash::backend::gpu::kernels::layout::{uniform_layouts, FieldLayout, StructLayout};
use llmflash::backend::gpu::shaders::{self, Half};

/// A struct as naga laid it out.
#[derive(Clone, Debug)]
struct WgslStruct {
    name: String,
    size: usize,
    /// (name, offset, size, scalar type or `None` for a non-scalar member)
    members: Vec<(String, usize, usize, Option<String>)>,
}

fn parse(kernel: &str, half: Half) -> naga::Module {
    let src = shaders::source(kernel, half).expect("listed kernel");
    naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{kernel}.wgsl: {}", e.emit_to_string(&src)))
}

fn scalar_name(s: naga::Scalar) -> Option<String> {
    let kind = match s.kind {
        naga::ScalarKind::Uint => "u",
        naga::ScalarKind::Sint => "i",
        naga::ScalarKind::Float => "f",
        _ => return None,
    };
    Some(format!("{kind}{}", u32::from(s.width) * 8))
}

/// The struct type `ty` is, or holds as array elements (storage buffers), if any.
fn struct_of(
    module: &naga::Module,
    ty: naga::Handle<naga::Type>,
) -> Option<naga::Handle<naga::Type>> {
    match module.types[ty].inner {
        naga::TypeInner::Struct { .. } => Some(ty),
        naga::TypeInner::Array { base, .. } | naga::TypeInner::BindingArray { base, .. } => {
            struct_of(module, base)
        }
        _ => None,
    }
}

fn wgsl_struct(
    module: &naga::Module,
    layouter: &naga::proc::Layouter,
    ty: naga::Handle<naga::Type>,
) -> WgslStruct {
    let t = &module.types[ty];
    let naga::TypeInner::Struct { members, span } = &t.inner else {
        panic!("not a struct: {t:?}");
    };
    WgslStruct {
        name: t.name.clone().unwrap_or_default(),
        size: *span as usize,
        members: members
            .iter()
            .map(|m| {
                let scalar = match module.types[m.ty].inner {
                    naga::TypeInner::Scalar(s) => scalar_name(s),
                    _ => None,
                };
                (
                    m.name.clone().unwrap_or_default(),
                    m.offset as usize,
                    layouter[m.ty].size as usize,
                    scalar,
                )
            })
            .collect(),
    }
}

/// The structs kernel `kernel`'s shader binds, in the `half` form: `(variable, address space,
/// struct)` for every uniform, and for every storage buffer of structs.
fn bound_structs(kernel: &str, half: Half) -> Vec<(String, &'static str, WgslStruct)> {
    let module = parse(kernel, half);
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .unwrap_or_else(|e| panic!("{kernel}.wgsl: layout: {e}"));
    let mut out = Vec::new();
    for (_, g) in module.global_variables.iter() {
        let space = match g.space {
            naga::AddressSpace::Uniform => "uniform",
            naga::AddressSpace::Storage { .. } => "storage",
            _ => continue,
        };
        let Some(ty) = struct_of(&module, g.ty) else {
            assert!(
                space != "uniform",
                "{kernel}.wgsl: uniform `{}` is not a struct; uniforms are structs with a Rust \
                 counterpart",
                g.name.as_deref().unwrap_or("?")
            );
            continue;
        };
        out.push((
            g.name.clone().unwrap_or_default(),
            space,
            wgsl_struct(&module, &layouter, ty),
        ));
    }
    out
}

/// What differs between `wgsl` and `rust` (empty when they match).
fn differences(wgsl: &WgslStruct, rust: &StructLayout) -> Vec<String> {
    let mut out = Vec::new();
    if wgsl.size != rust.size {
        out.push(format!(
            "size: WGSL {} bytes, Rust {} bytes",
            wgsl.size, rust.size
        ));
    }
    let named_wgsl: Vec<_> = wgsl
        .members
        .iter()
        .filter(|m| !m.0.starts_with('_'))
        .collect();
    let named_rust: Vec<&FieldLayout> = rust.fields.iter().filter(|f| !f.is_padding()).collect();
    let show_wgsl =
        |m: &(String, usize, usize, Option<String>)| format!("{} at {} ({} bytes)", m.0, m.1, m.2);
    let show_rust = |f: &FieldLayout| format!("{} at {} ({} bytes)", f.name, f.offset, f.size);
    for i in 0..named_wgsl.len().max(named_rust.len()) {
        match (named_wgsl.get(i), named_rust.get(i)) {
            (Some(w), Some(r)) => {
                if (w.0.as_str(), w.1, w.2) != (r.name, r.offset, r.size) {
                    out.push(format!(
                        "field {i}: WGSL {}, Rust {}",
                        show_wgsl(w),
                        show_rust(r)
                    ));
                } else if let Some(ty) = &w.3 {
                    if ty != r.ty {
                        out.push(format!("field `{}`: WGSL {ty}, Rust {}", r.name, r.ty));
                    }
                }
            }
            (Some(w), None) => out.push(format!("field {} only in WGSL", show_wgsl(w))),
            (None, Some(r)) => out.push(format!("field {} only in Rust", show_rust(r))),
            (None, None) => {}
        }
    }
    out
}

#[test]
fn every_uniform_struct_matches_its_rust_struct() {
    let layouts = uniform_layouts();
    let mut failures = Vec::new();
    let mut used = vec![false; layouts.len()];
    for kernel in shaders::names() {
        for half in [Half::Packed, Half::Native] {
            for (var, space, wgsl) in bound_structs(kernel, half) {
                let Some(i) = layouts
                    .iter()
                    .position(|(k, s, _)| *k == kernel && *s == wgsl.name)
                else {
                    failures.push(format!(
                        "{kernel}.wgsl: {space} `{var}: {}` has no Rust struct in \
                         uniform_layouts() (src/backend/gpu/kernels/layout.rs)",
                        wgsl.name
                    ));
                    continue;
                };
                used[i] = true;
                let rust = &layouts[i].2;
                for d in differences(&wgsl, rust) {
                    failures.push(format!(
                        "{kernel}.wgsl ({} form): `{var}: {}` vs {}: {d}",
                        half.name(),
                        wgsl.name,
                        rust.name
                    ));
                }
            }
        }
    }
    for ((kernel, name, rust), used) in layouts.iter().zip(&used) {
        if !used {
            failures.push(format!(
                "uniform_layouts() lists {kernel}'s `{name}` ({}), which {kernel}.wgsl does not bind",
                rust.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "WGSL and Rust struct layouts differ:\n{}",
        failures.join("\n")
    );
}

/// The check above must be able to fail: a field added, reordered or retyped on either side
/// is reported.
#[test]
fn a_field_changed_on_one_side_is_caught() {
    let (_, _, wgsl) = bound_structs("embed", Half::Packed)
        .into_iter()
        .find(|(_, space, s)| *space == "uniform" && s.name == "Params")
        .expect("embed binds Params");
    let rust = uniform_layouts()
        .into_iter()
        .find(|(k, s, _)| *k == "embed" && *s == "Params")
        .expect("embed's Params is listed")
        .2;
    assert_eq!(differences(&wgsl, &rust), Vec::<String>::new());

    // Rust: two fields swapped.
    let mut swapped = rust.clone();
    let (a, b) = (swapped.fields[0].offset, swapped.fields[1].offset);
    swapped.fields.swap(0, 1);
    (swapped.fields[0].offset, swapped.fields[1].offset) = (a, b);
    assert!(
        !differences(&wgsl, &swapped).is_empty(),
        "a swap went unnoticed"
    );

    // Rust: a field added in place of padding (same size).
    let mut added = rust.clone();
    let pad = added
        .fields
        .iter()
        .position(FieldLayout::is_padding)
        .expect("embed's Params has padding");
    let offset = added.fields[pad].offset;
    added.fields.insert(
        pad,
        FieldLayout {
            name: "extra",
            offset,
            size: 4,
            ty: "u32",
        },
    );
    assert!(
        !differences(&wgsl, &added).is_empty(),
        "an added field went unnoticed"
    );

    // Rust: a field retyped.
    let mut retyped = rust.clone();
    retyped.fields[0].ty = "f32";
    assert!(
        !differences(&wgsl, &retyped).is_empty(),
        "a retyped field went unnoticed"
    );

    // WGSL: a field added in place of padding, then one appended (growing the struct).
    let src = shaders::source("embed", Half::Packed).expect("embed");
    for edit in [
        src.replacen("    _pad0: u32,", "    extra: u32,", 1),
        src.replacen(
            "    _pad2: u32,\n}",
            "    _pad2: u32,\n    extra: u32,\n}",
            1,
        ),
    ] {
        assert_ne!(edit, src, "the edit applies");
        let module = naga::front::wgsl::parse_str(&edit).expect("edited embed parses");
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).expect("layout");
        let ty = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Params"))
            .expect("Params")
            .0;
        let edited = wgsl_struct(&module, &layouter, ty);
        assert!(
            !differences(&edited, &rust).is_empty(),
            "a WGSL-only field went unnoticed"
        );
    }
}
