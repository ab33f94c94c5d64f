//! Review rules checked on the source tree, so that they hold without anyone remembering them:
//!
//! 1. No `.unwrap()` in library code (tests aside): a failure from input or I/O is an error
//!    with a message; an `expect` states the invariant (checked at load) that makes it safe.
//! 2. No `{source}` in an `#[error]` message: thiserror makes a field named `source` the
//!    error's cause, and a report (`{:#}`, anyhow) prints the cause after the message, so the
//!    OS error would be printed twice.
//! 3. No command-line flag (`--name`) in a string of library code outside `src/cli/`: the
//!    library says what to change in its own terms, and the CLI maps its errors to flags
//!    (`src/cli/hints.rs`), so that an embedding application's users are not told about
//!    flags they do not have.

use std::path::{Path, PathBuf};

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

/// Each library source file's code (comments, blank lines and `#[cfg(test)]` modules left
/// out) as numbered lines.
fn library_files() -> Vec<(PathBuf, Vec<(usize, String)>)> {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "tests.rs" || name == "testing.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source is readable");
        out.push((file, code_lines(&text)));
    }
    out
}

/// `text`'s lines that are code: a `#[cfg(test)]` module is skipped to its closing brace.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        let next = lines.get(i + 1).map_or("", |l| l.trim_start());
        if t == "#[cfg(test)]" && (next.starts_with("mod ") || next.contains(" mod ")) {
            let mut depth = 0i64;
            let mut opened = false;
            i += 1;
            while i < lines.len() && !(opened && depth == 0) {
                for c in lines[i].chars() {
                    match c {
                        '{' => (depth, opened) = (depth + 1, true),
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                i += 1;
            }
            continue;
        }
        if !(t.starts_with("//") || t.is_empty()) {
            out.push((i + 1, lines[i].to_string()));
        }
        i += 1;
    }
    out
}

fn library_lines() -> Vec<(PathBuf, usize, String)> {
    (library_files().into_iter())
        .flat_map(|(f, lines)| lines.into_iter().map(move |(n, l)| (f.clone(), n, l)))
        .collect()
}

fn report(rule: &str, found: &[String]) {
    assert!(found.is_empty(), "{rule}:\n{}", found.join("\n"));
}

fn located(file: &Path, n: usize, line: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rel = file.strip_prefix(root).unwrap_or(file);
    format!("{}:{n}: {}", rel.display(), line.trim())
}

#[test]
fn library_code_does_not_unwrap() {
    let found: Vec<String> = library_lines()
        .iter()
        .filter(|(_, _, l)| l.contains(".unwrap()"))
        .map(|(f, n, l)| located(f, *n, l))
        .collect();
    report(
        "`.unwrap()` in library code (return an error, or `expect` an invariant)",
        &found,
    );
}

#[test]
fn error_messages_do_not_repeat_their_source() {
    let found: Vec<String> = library_lines()
        .iter()
        .filter(|(_, _, l)| l.contains("{source}"))
        .map(|(f, n, l)| located(f, *n, l))
        .collect();
    report(
        "`{source}` in a message (a report prints the cause again)",
        &found,
    );
}

/// The string literals of `code` with the line each starts on (`\\"` escapes handled; raw
/// strings are not used for messages here).
fn strings(code: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in code {
        let mut escaped = false;
        for c in line.chars() {
            match (&mut current, c, escaped) {
                (None, '"', _) => current = Some((*n, String::new())),
                (Some(_), '\\', false) => escaped = true,
                (Some(_), '"', false) => out.extend(current.take()),
                (Some((_, s)), c, _) => {
                    s.push(c);
                    escaped = false;
                }
                (None, _, _) => {}
            }
        }
        if let Some((_, s)) = &mut current {
            s.push('\n');
        }
    }
    out
}

fn names_a_flag(s: &str) -> bool {
    s.match_indices("--").any(|(i, _)| {
        let before = s[..i].chars().next_back();
        let after = s[i + 2..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '-')
            && after.is_some_and(|c| c.is_ascii_lowercase())
    })
}

#[test]
fn library_messages_name_no_command_line_flags() {
    let cli = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join("cli");
    let mut found = Vec::new();
    for (file, code) in library_files().iter().filter(|(f, _)| !f.starts_with(&cli)) {
        for (n, s) in strings(code).iter().filter(|(_, s)| names_a_flag(s)) {
            found.push(located(file, *n, s));
        }
    }
    report(
        "a command-line flag in library code (say it in library terms; map it in src/cli/hints.rs)",
        &found,
    );
}

#[test]
fn the_rules_see_what_they_look_for() {
    assert!(names_a_flag("use a larger --ctx"));
    assert!(names_a_flag("--kv-type f32"));
    assert!(!names_a_flag("x--y, a -- b, --5"));
    let code: Vec<(usize, String)> = [r#"f("a \"b\" c", "x"); g("one"#, r#"  --two")"#]
        .iter()
        .enumerate()
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect();
    let found = strings(&code);
    assert_eq!(found[0], (1, r#"a "b" c"#.to_string()));
    assert_eq!(found[2], (1, "one\n  --two".to_string()));
    let test_module =
        "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn b() { x.unwrap() }\n}\nfn c() {}";
    let lines: Vec<String> = code_lines(test_module)
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert_eq!(lines, vec!["fn a() {}", "fn c() {}"]);
}
