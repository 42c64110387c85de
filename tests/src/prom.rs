//! Prometheus's own tools for the tests: `promtool` found (or its absence
//! said), run on a scrape or a rules file, and one sample read off a scrape.

/// Prometheus's `promtool`, if installed: `PROMTOOL_BIN`, or on `PATH`
/// (`scripts/test.sh` puts one in `.local/bin`). Without it a test says it
/// skipped — unless `CI` is set, where a missing promtool fails the test.
pub fn promtool() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PROMTOOL_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI (scripts/test.sh installs it into .local/bin)"
        );
        println!(
            "SKIPPED: promtool is not installed (scripts/test.sh installs it into .local/bin; or set PROMTOOL_BIN)"
        );
    }
    found
}

/// Runs `promtool {args}` with `stdin`; returns whether it passed and what it said.
pub fn run_promtool(promtool: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool finishes");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The value of the sample written exactly as `series` (name and labels as
/// the exposition writes them) in Prometheus text; `None` when absent.
pub fn prom_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
