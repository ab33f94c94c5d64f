//! The module graph is one-way: the modules of `src/` form one order ([`LAYERS`], top first),
//! and each uses only the modules below it. This test reads every file under `src/` (test
//! code too: `tests.rs` files and `mod tests` keep the same rule), finds each `crate::` path
//! (in `use` lines, `use crate::{a, b::c}` groups, and inline paths; comments and string
//! literals left out), and fails on an edge that points up or sideways. It also checks that
//! docs/architecture.md ("Module dependencies") lists the same order and the same edges.
//!
//! A file's layer is its top-level module (`src/engine/flash/mod.rs` is `engine`), except
//! under `src/backend/`: `cpu/` and `gpu/` are layers of their own, and the files beside
//! them (`backend/kv_cache.rs`, ...) are `backend`. `lib.rs` and `main.rs` only declare and
//! start the modules. `super::` paths are not followed: none leaves its top-level module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first: a file in one may name only those after it. docs/architecture.md
/// draws this order; change both together.
const LAYERS: &[&str] = &[
    "cli",
    "serve",
    "api",
    "draft",
    "calibration",
    "engine",
    "backend/gpu",
    "sparsity",
    "backend/cpu",
    "backend",
    "image",
    "model",
    "quant",
    "window",
    "storage",
    "budget",
    "rng",
];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

/// The layer of a module path's first segments (`["backend", "cpu", ...]`).
fn layer_of(segments: &[&str]) -> String {
    match segments {
        ["backend", sub @ ("cpu" | "gpu"), ..] => format!("backend/{sub}"),
        [first, ..] => first.to_string(),
        [] => String::new(),
    }
}

/// The layer of a file, from its path under `src/`; `None` for `lib.rs` and `main.rs`.
fn file_layer(rel: &Path) -> Option<String> {
    let parts: Vec<&str> = rel
        .iter()
        .filter_map(|p| p.to_str())
        .map(|p| p.strip_suffix(".rs").unwrap_or(p))
        .collect();
    match parts.as_slice() {
        ["lib"] | ["main"] => None,
        _ => Some(layer_of(&parts)),
    }
}

/// `src` with comments and the contents of string and character literals blanked (newlines
/// kept, so that byte offsets still give line numbers).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend(s.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }))
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        let skip = if rest.starts_with(b"//") {
            rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            block_comment_len(rest)
        } else if rest[0] == b'"' {
            string_len(rest)
        } else if let Some(n) = raw_string_len(rest, i > 0 && is_ident(b[i - 1])) {
            n
        } else if rest[0] == b'\'' {
            char_len(rest)
        } else {
            0
        };
        if skip == 0 {
            out.push(b[i]);
            i += 1;
        } else {
            blank(&mut out, &rest[..skip]);
            i += skip;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Length of the (possibly nested) block comment at the start of `s`.
fn block_comment_len(s: &[u8]) -> usize {
    let (mut depth, mut i) = (0usize, 0);
    while i < s.len() {
        if s[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if s[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    s.len()
}

/// Length of the string literal (with escapes) at the start of `s`.
fn string_len(s: &[u8]) -> usize {
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    s.len()
}

/// Length of the raw string literal (`r"..."`, `r#"..."#`, `br"..."`) at the start of `s`, if
/// one starts there (not inside an identifier ending in `r`).
fn raw_string_len(s: &[u8], after_ident: bool) -> Option<usize> {
    let start = match s {
        [b'r', ..] => 1,
        [b'b', b'r', ..] => 2,
        _ => return None,
    };
    if after_ident {
        return None;
    }
    let hashes = s[start..].iter().take_while(|&&c| c == b'#').count();
    if s.get(start + hashes) != Some(&b'"') {
        return None;
    }
    let open = start + hashes + 1;
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let end = s[open..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map_or(s.len(), |p| open + p + close.len());
    Some(end)
}

/// Length of the character literal at the start of `s` (`'x'`, `'\n'`, `'"'`), or 0 for a
/// lifetime or label (`'a`), which is code.
fn char_len(s: &[u8]) -> usize {
    if s.get(1) == Some(&b'\\') {
        return s[2..].iter().position(|&c| c == b'\'').map_or(0, |p| p + 3);
    }
    // One character, possibly several bytes of UTF-8, then the closing quote.
    let width = match s.get(1) {
        Some(&c) if c >= 0xf0 => 4,
        Some(&c) if c >= 0xe0 => 3,
        Some(&c) if c >= 0xc0 => 2,
        Some(_) => 1,
        None => return 0,
    };
    match s.get(1 + width) {
        Some(b'\'') => 2 + width,
        _ => 0,
    }
}

/// Every module path named by a `crate::` path in `code` (from [`code_only`]), with the byte
/// offset of its `crate`: `crate::a::b::C` gives `["a", "b", "C"]`; a group
/// `crate::a::{b::C, d}` gives `["a", "b", "C"]` and `["a", "d"]`.
fn crate_paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(p) = code[from..].find("crate::") {
        let at = from + p;
        from = at + "crate::".len();
        let before = at.checked_sub(1).map(|i| b[i]);
        if before.is_some_and(|c| is_ident(c) || c == b'$') {
            continue; // `$crate` in a macro, or an identifier ending in `crate`
        }
        for path in expand(&code[from..], Vec::new()) {
            out.push((at, path));
        }
    }
    out
}

/// The paths of the use tree (or inline path) at the start of `s`, each prefixed by `prefix`.
fn expand(s: &str, prefix: Vec<String>) -> Vec<Vec<String>> {
    let s = s.trim_start();
    if let Some(inner) = s.strip_prefix('{') {
        let body = &inner[..group_end(inner)];
        return split_top(body)
            .into_iter()
            .flat_map(|item| expand(item, prefix.clone()))
            .collect();
    }
    let ident: String = s
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if ident.is_empty() {
        return if prefix.is_empty() {
            vec![]
        } else {
            vec![prefix]
        };
    }
    let mut path = prefix;
    if ident != "self" {
        path.push(ident.clone());
    }
    match s[ident.len()..].trim_start().strip_prefix("::") {
        Some(rest) => expand(rest, path),
        None => vec![path],
    }
}

/// The index of the `}` closing a group whose `{` was just before `s`.
fn group_end(s: &str) -> usize {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    s.len()
}

/// The comma-separated items of a group's body, commas inside nested groups kept.
fn split_top(body: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&body[start..]);
    items.into_iter().filter(|i| !i.trim().is_empty()).collect()
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("src is readable").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// One `crate::` path of a file: where, and the layer it names.
struct Use {
    file: PathBuf,
    line: usize,
    path: String,
    from: String,
    to: String,
}

fn uses() -> Vec<Use> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src").to_path_buf();
        let Some(from) = file_layer(&rel) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("source is UTF-8");
        let code = code_only(&text);
        for (at, path) in crate_paths(&code) {
            let segments: Vec<&str> = path.iter().map(String::as_str).collect();
            out.push(Use {
                file: rel.clone(),
                line: code[..at].matches('\n').count() + 1,
                path: format!("crate::{}", path.join("::")),
                from: from.clone(),
                to: layer_of(&segments),
            });
        }
    }
    out
}

#[test]
fn every_module_uses_only_modules_below_it() {
    let mut wrong = Vec::new();
    for u in uses() {
        if u.from == u.to {
            continue;
        }
        match (rank(&u.from), rank(&u.to)) {
            (Some(a), Some(b)) if a < b => {}
            (None, _) => wrong.push(format!(
                "src/{}: module `{}` is not in LAYERS; place it in tests/layering.rs and docs/architecture.md",
                u.file.display(),
                u.from
            )),
            (_, None) => wrong.push(format!(
                "src/{}:{}: `{}` names `{}`, which is not in LAYERS",
                u.file.display(),
                u.line,
                u.path,
                u.to
            )),
            _ => wrong.push(format!(
                "src/{}:{}: `{}` makes {} -> {}, but {} is above {}",
                u.file.display(),
                u.line,
                u.path,
                u.from,
                u.to,
                u.to,
                u.from
            )),
        }
    }
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports that point up the layers (order, top first: {}):\n{}",
        LAYERS.join(" "),
        wrong.join("\n")
    );
}

/// The edges between layers, as docs/architecture.md draws them: `from -> to...` with each
/// side in [`LAYERS`] order.
fn edge_lines() -> Vec<String> {
    let mut edges: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for layer in LAYERS {
        edges.insert(rank(layer).expect("listed"), BTreeSet::new());
    }
    for u in uses() {
        if let (Some(a), Some(b)) = (rank(&u.from), rank(&u.to)) {
            if a != b {
                edges.entry(a).or_default().insert(b);
            }
        }
    }
    let width = LAYERS.iter().map(|l| l.len()).max().unwrap_or(0);
    edges
        .iter()
        .map(|(&a, to)| {
            let to: Vec<&str> = to.iter().map(|&b| LAYERS[b]).collect();
            let to = if to.is_empty() {
                "(nothing)".to_string()
            } else {
                to.join(" ")
            };
            format!("{:width$} -> {to}", LAYERS[a])
        })
        .collect()
}

/// The code blocks of docs/architecture.md's "Module dependencies" section, as lines.
fn documented_blocks() -> Vec<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md");
    let doc = std::fs::read_to_string(path).expect("docs/architecture.md is readable");
    let start = doc
        .find("## Module dependencies")
        .expect("docs/architecture.md has a \"Module dependencies\" section");
    let section = &doc[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| {
            block
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[test]
fn the_architecture_document_draws_this_order_and_these_edges() {
    let blocks = documented_blocks();
    assert!(
        blocks.len() >= 2,
        "docs/architecture.md's \"Module dependencies\" should hold two code blocks: the layers, then the edges"
    );
    let order: Vec<&str> = blocks[0]
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        order, LAYERS,
        "the layers drawn in docs/architecture.md (first code block of \"Module dependencies\") differ from LAYERS in tests/layering.rs"
    );
    let want = edge_lines();
    let words = |l: &String| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let drawn: Vec<String> = blocks[1].iter().map(words).collect();
    assert!(
        drawn == want.iter().map(words).collect::<Vec<_>>(),
        "the edges drawn in docs/architecture.md (second code block of \"Module dependencies\") are not the code's; they are:\n{}",
        want.join("\n")
    );
}

#[test]
fn paths_are_found_in_groups_and_inline_but_not_in_comments_or_strings() {
    let code = code_only(
        "use crate::{a, b::{c, d::E}, backend::{cpu::x, gpu}};\n\
         // crate::commented::out\n\
         let s = \"crate::in_a_string // not a comment\"; let r = r#\"crate::raw\"#;\n\
         let q = '\"'; fn f<'a>(x: &'a u8) -> u8 { crate::f::g(x) }\n\
         macro_rules! m { () => { $crate::macro_path }; }\n",
    );
    let paths: Vec<String> = crate_paths(&code)
        .into_iter()
        .map(|(_, p)| p.join("::"))
        .collect();
    assert_eq!(
        paths,
        [
            "a",
            "b::c",
            "b::d::E",
            "backend::cpu::x",
            "backend::gpu",
            "f::g"
        ]
    );
    let layers: Vec<String> = ["backend::cpu::x", "backend::kv_cache", "engine::flash"]
        .iter()
        .map(|p| layer_of(&p.split("::").collect::<Vec<_>>()))
        .collect();
    assert_eq!(layers, ["backend/cpu", "backend", "engine"]);
    assert_eq!(
        file_layer(Path::new("backend/gpu/flash/mod.rs")).as_deref(),
        Some("backend/gpu")
    );
    assert_eq!(file_layer(Path::new("lib.rs")), None);
}
