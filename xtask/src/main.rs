//! `cargo xtask`: repository chores that must not live in shell scripts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "coordkit repository chores")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Regenerate the checked-in JSON Schemas and AsyncAPI document in `schemas/`
    /// from the Rust wire types and subjects, and the subject table in
    /// `docs/protocol.md`. A test fails when any of them drifts.
    Schemas,
    /// Check the house rules on every crate's `src/`: a `//!` doc on every
    /// file, no IO in a `machine/` core, no file over the size limit.
    Tidy,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Schemas => {
            let root = workspace_root();
            write_schemas(&root.join(xtask::SCHEMA_DIR))?;
            write_protocol_table(&root.join(xtask::PROTOCOL_DOC))
        }
        Task::Tidy => {
            let problems = xtask::tidy::check(&workspace_root())?;
            for p in &problems {
                println!("{p}");
            }
            anyhow::ensure!(problems.is_empty(), "{} rule(s) broken", problems.len());
            println!("tidy: every rule holds");
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Writes every generated file and removes stale ones, so the folder holds exactly
/// what the code generates.
fn write_schemas(dir: &Path) -> anyhow::Result<()> {
    let files = xtask::generate()?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !files.contains_key(name) {
            std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
            println!("removed {}", path.display());
        }
    }
    for (name, text) in &files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    println!("{} files in {}", files.len(), dir.display());
    Ok(())
}

fn write_protocol_table(doc: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(doc).with_context(|| format!("read {}", doc.display()))?;
    let table = xtask::subjects_markdown(&xtask::channels()?);
    let new = xtask::splice_subjects(&text, &table)?;
    if new != text {
        std::fs::write(doc, new).with_context(|| format!("write {}", doc.display()))?;
        println!("wrote the subject table in {}", doc.display());
    }
    Ok(())
}
