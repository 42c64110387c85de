//! The checked-in protocol artefacts must be exactly what the code generates, and
//! the generator's table must cover every subject `common::subject` defines.

// Test helpers fail fast, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(xtask::SCHEMA_DIR)
}

#[test]
fn checked_in_schemas_match_the_code() {
    let files = xtask::generate().unwrap();
    let dir = schema_dir();
    let mut problems = Vec::new();
    for (name, text) in &files {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(on_disk) if &on_disk == text => {}
            Ok(_) => problems.push(format!("{name} differs")),
            Err(_) => problems.push(format!("{name} is missing")),
        }
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !files.contains_key(&name) {
            problems.push(format!("{name} is not generated any more"));
        }
    }
    assert!(
        problems.is_empty(),
        "schemas/ is out of date ({}); run `cargo xtask schemas` and commit the result",
        problems.join(", ")
    );
}

#[test]
fn protocol_page_subject_table_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(xtask::PROTOCOL_DOC);
    let doc = std::fs::read_to_string(path).unwrap();
    let table = xtask::subjects_markdown(&xtask::channels().unwrap());
    let expected = xtask::splice_subjects(&doc, &table).unwrap();
    assert!(
        doc == expected,
        "the subject table in {} is out of date; run `cargo xtask schemas` and commit the result",
        xtask::PROTOCOL_DOC
    );
}

/// Names in `common::subject` that are not a channel of their own, and why.
const NOT_CHANNELS: &[(&str, &str)] = &[
    ("ROOT", "prefix of every subject"),
    ("ALL", "wildcard over every subject"),
    (
        "MONITOR_INTAKE",
        "wildcards: what the monitor subscribes to",
    ),
    ("STATE_WATCH_PREFIX", "prefix of the state_watch channel"),
    ("STATE_WATCH_ALL", "wildcard over state_watch"),
    ("SYNC_ACK_ALL", "wildcard over sync_ack"),
    ("AGENT_REGISTER_ALL", "wildcard over agent_register"),
    ("AGENT_DEREGISTER_ALL", "wildcard over agent_deregister"),
    ("AGENT_LEAVE_ALL", "wildcard over agent_leave"),
    ("AGENT_STATE_GET_ALL", "wildcard over agent_state_get"),
    ("AGENT_STATE_PUT_ALL", "wildcard over agent_state_put"),
    ("AGENT_STATE_DELETE_ALL", "wildcard over agent_state_delete"),
    (
        "AGENT_STATE_HISTORY_ALL",
        "wildcard over agent_state_history",
    ),
    ("HEARTBEAT_ALL", "wildcard over heartbeat"),
    ("PROBE_HEADER", "a header on assign, not a subject"),
    ("ASSIGN_ALL", "wildcard over assign"),
    (
        "REPORT_ALL",
        "wildcard over report (the report stream's subjects)",
    ),
    ("EVENTS_ALL", "wildcard over the event channels"),
    ("FLOW_WATCH_ALL", "wildcard over flow_watch"),
    ("event::ANOMALY_ALL", "wildcard over event::anomaly"),
    ("state_watch_scope", "wildcard over state_watch"),
    ("event::UNKNOWN", "never published by this build"),
    ("agent_of", "parses subjects, builds none"),
    ("agent_event_of", "parses subjects, builds none"),
    ("AGENT_EVENTS_PUBLISH_ALL", "wildcard over agent_event"),
    (
        "AGENT_EVENTS_ALL",
        "wildcard over agent_event_stored (the agent events stream's subjects)",
    ),
    ("agent_events_filter", "wildcard over agent_event_stored"),
    ("family", "metrics label, builds no subject"),
];

/// `pub const NAME` and `pub fn name` in `common/src/subject.rs`, with `event::` for
/// the events module.
fn subject_names() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/src/subject.rs");
    let text = std::fs::read_to_string(path).unwrap();
    let mut prefix = "";
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("pub mod event") {
            prefix = "event::";
        } else if line.starts_with('}') {
            prefix = "";
        }
        let line = line.trim_start();
        let name = line
            .strip_prefix("pub const ")
            .and_then(|rest| rest.split(':').next())
            .or_else(|| {
                line.strip_prefix("pub fn ")
                    .and_then(|rest| rest.split('(').next())
            });
        if let Some(name) = name {
            names.insert(format!("{prefix}{}", name.trim()));
        }
    }
    names
}

#[test]
fn every_subject_has_a_channel() {
    let channels = xtask::channels().unwrap();
    let covered: BTreeSet<String> = channels.iter().map(|c| c.source.to_owned()).collect();
    let excused: BTreeSet<String> = NOT_CHANNELS.iter().map(|(n, _)| n.to_string()).collect();
    let names = subject_names();
    assert!(names.len() > 50, "parsed too few names: {names:?}");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !covered.contains(*n) && !excused.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "subjects without a row in xtask::channels(): {missing:?}"
    );
    let unknown: Vec<&String> = covered
        .union(&excused)
        .filter(|n| !names.contains(*n))
        .collect();
    assert!(unknown.is_empty(), "rows naming no subject: {unknown:?}");
    let ids: BTreeSet<&str> = channels.iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), channels.len(), "channel ids must be unique");
}
