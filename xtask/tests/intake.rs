//! The monitor's subscriptions must see every one-way subject of the protocol
//! and match no request subject: one that did would count as interest, and a
//! request to a service that is down would time out instead of failing at
//! once with "no responders". Nor may they match an agent's assignment
//! subject, where the allocator reads "no responders" as "this agent does not
//! listen".

// Test helpers fail fast, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use common::subject::MONITOR_INTAKE;
use xtask::Pattern;

/// Whether NATS delivers a message on `subject` to a subscription on `filter`.
fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A channel's address with every `{parameter}` filled in with a sample token.
fn concrete(address: &str) -> String {
    address
        .split('.')
        .map(|t| if t.starts_with('{') { "x1" } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

#[test]
fn the_matcher_follows_nats_wildcards() {
    assert!(matches("coord.agents.*.sync", "coord.agents.a.sync"));
    assert!(!matches("coord.agents.*.sync", "coord.agents.a.sync.ack"));
    assert!(matches("coord.events.>", "coord.events.task.ready"));
    assert!(!matches("coord.events.>", "coord.events"));
    assert!(matches("coord.agents.*.>", "coord.agents.a.state.get"));
}

#[test]
fn the_monitor_sees_every_publish_and_no_request() {
    let mut unseen = Vec::new();
    let mut masked = Vec::new();
    for c in xtask::channels().unwrap() {
        let subject = concrete(&c.address);
        let hit: Vec<&str> = MONITOR_INTAKE
            .iter()
            .copied()
            .filter(|f| matches(f, &subject))
            .collect();
        let probed = c.address == "coord.agents.{agent_id}.assign";
        match c.pattern {
            Pattern::Publish { .. } if probed && !hit.is_empty() => {
                masked.push(format!("{} (by {})", c.address, hit.join(", ")))
            }
            Pattern::Publish { .. } if probed => {}
            Pattern::Publish { .. } if hit.is_empty() => unseen.push(c.address.clone()),
            Pattern::Request { .. } if !hit.is_empty() => {
                masked.push(format!("{} (by {})", c.address, hit.join(", ")))
            }
            _ => {}
        }
    }
    assert!(
        unseen.is_empty(),
        "one-way subjects the monitor does not see: {unseen:?}"
    );
    assert!(
        masked.is_empty(),
        "request or assignment subjects the monitor subscribes to: {masked:?}"
    );
}
