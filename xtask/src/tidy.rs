//! `cargo xtask tidy`: the house rules a reviewer would otherwise have to
//! remember, checked on every crate's `src/`:
//!
//! - every file opens with its `//!` doc;
//! - a pure core (any file under a `machine/` folder) does no IO and keeps no
//!   storage bookkeeping: it names neither tokio, async-nats, the file system
//!   or network, nor the crate's store or outbox;
//! - no file is longer than [`MAX_LINES`].
//!
//! Files that broke a rule before it was checked are listed in [`LEGACY`]
//! with what they were then. The list only shrinks: a listed file that grows
//! fails, and so does one that has come within the rule (its entry must go).

use std::path::{Path, PathBuf};

/// Most lines a source file may have.
pub const MAX_LINES: usize = 600;

/// Words a pure core may not use (outside comments): the runtime, the bus,
/// the file system and network, and the modules that keep a flow's storage
/// (its entries and pages, its outbox of events).
const IO_WORDS: &[&str] = &[
    "tokio",
    "async_nats",
    "std::fs",
    "std::net",
    "crate::store",
    "crate::outbox",
];

/// A rule a file broke before the rule was checked.
pub enum Legacy {
    /// Longer than [`MAX_LINES`]: at most this many lines.
    Lines(usize),
    /// A pure core that reaches the store.
    Io,
}

/// What was over the rules when tidy came in, and is still to be split.
pub const LEGACY: &[(&str, Legacy)] = &[
    ("coordkit/src/cli/alloc.rs", Legacy::Lines(605)),
    ("coordkit/src/cli/conformance.rs", Legacy::Lines(736)),
    ("coordkit/src/cli/sync.rs", Legacy::Lines(610)),
    ("tests/src/bin/coord-bench/scale.rs", Legacy::Lines(800)),
    ("tests/src/bin/coord-bench/state.rs", Legacy::Lines(795)),
];

/// Every `.rs` file under each crate's `src/` in `root`, as paths relative
/// to `root` with `/` separators, sorted.
pub fn sources(root: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let dir = entry?.path();
        if dir.join("Cargo.toml").is_file() && dir.join("src").is_dir() {
            walk(&dir.join("src"), &mut out)?;
        }
    }
    let mut rel: Vec<String> = out
        .iter()
        .filter_map(|p| p.strip_prefix(root).ok())
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    rel.sort();
    Ok(rel)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// What breaks the rules in the file `path` (relative) holding `text`.
pub fn check_file(path: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let legacy = |want: fn(&Legacy) -> Option<usize>| {
        LEGACY
            .iter()
            .filter(|(p, _)| *p == path)
            .find_map(|(_, l)| want(l))
    };
    if !text.trim_start().starts_with("//!") {
        problems.push(format!(
            "{path}: opens without a `//!` doc saying what it is for"
        ));
    }
    let lines = text.lines().count();
    match legacy(|l| match l {
        Legacy::Lines(n) => Some(*n),
        Legacy::Io => None,
    }) {
        Some(most) if lines > most => problems.push(format!(
            "{path}: {lines} lines, more than the {most} it had when tidy came in: split it"
        )),
        Some(_) if lines <= MAX_LINES => problems.push(format!(
            "{path}: {lines} lines, within {MAX_LINES} now: take it off tidy's legacy list"
        )),
        Some(_) => {}
        None if lines > MAX_LINES => problems.push(format!(
            "{path}: {lines} lines, more than {MAX_LINES}: split it by job"
        )),
        None => {}
    }
    if path.split('/').any(|part| part == "machine") {
        let io: Vec<&str> = IO_WORDS
            .iter()
            .copied()
            .filter(|w| code_lines(text).any(|l| l.contains(w)))
            .collect();
        let excused = legacy(|l| matches!(l, Legacy::Io).then_some(0)).is_some();
        match (io.is_empty(), excused) {
            (false, false) => problems.push(format!(
                "{path}: a pure core names {}: IO and storage belong to the service",
                io.join(", ")
            )),
            (true, true) => problems.push(format!(
                "{path}: no longer reaches IO or the store: take it off tidy's legacy list"
            )),
            _ => {}
        }
    }
    problems
}

/// `text`'s lines with comments left out.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter_map(|l| {
        let code = l.split("//").next().unwrap_or_default();
        (!code.trim().is_empty()).then_some(code)
    })
}

/// Every rule broken in the workspace at `root`.
pub fn check(root: &Path) -> std::io::Result<Vec<String>> {
    let files = sources(root)?;
    let mut problems = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(root.join(path))?;
        problems.extend(check_file(path, &text));
    }
    for (path, _) in LEGACY {
        if !files.iter().any(|f| f == path) {
            problems.push(format!(
                "{path}: on tidy's legacy list but gone: take it off"
            ));
        }
    }
    Ok(problems)
}
