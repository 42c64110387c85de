//! The house rules hold on the workspace (`cargo xtask tidy` says which
//! file breaks which), and each rule catches what it is meant to.

// Test helpers fail fast, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use xtask::tidy::{check, check_file, MAX_LINES};

#[test]
fn the_workspace_keeps_the_house_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let problems = check(root).unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn each_rule_catches_its_case() {
    let doc = "//! What this is for.\n";
    assert!(check_file("a/src/x.rs", doc).is_empty());
    assert_eq!(check_file("a/src/x.rs", "fn f() {}\n").len(), 1);
    let long = format!("{doc}{}", "fn f() {}\n".repeat(MAX_LINES));
    assert_eq!(check_file("a/src/x.rs", &long).len(), 1);
    let io = format!("{doc}use tokio::sync::Mutex;\n");
    assert!(check_file("a/src/x.rs", &io).is_empty());
    assert_eq!(check_file("a/src/machine/x.rs", &io).len(), 1);
    let store = format!("{doc}fn f() {{ crate::store::encode(); }}\n");
    assert_eq!(check_file("a/src/machine/deep/x.rs", &store).len(), 1);
    let mentioned = format!("{doc}// no tokio here\nfn f() {{}}\n");
    assert!(check_file("a/src/machine/x.rs", &mentioned).is_empty());
}
