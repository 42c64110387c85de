//! The allocator history checker: a pure function over what clients saw
//! (every attempt of every allocate and release, with its outcome) and what
//! the ledger held (every revision of every agent record), which says whether
//! the two agree.
//!
//! It replays the agent records in revision order (the bucket's revisions are
//! one sequence across keys) to learn, for every allocation id, when and where
//! it was booked and when it was removed, then holds each attempt against
//! that. Clients and server share one clock (the same machine), so an attempt's
//! invocation and completion times bracket the revisions it could have made.
//! An attempt that timed out is indeterminate: it may or may not have taken
//! effect, and either is accepted as long as what follows is consistent with it.

use std::collections::{BTreeMap, BTreeSet};

/// What a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    /// Book an allocation under a caller-chosen id.
    Allocate { id: String },
    /// Give it back (on the agent the grant named, when the client knows it).
    Release { id: String },
}

impl Op {
    fn id(&self) -> &str {
        match self {
            Op::Allocate { id } | Op::Release { id } => id,
        }
    }
}

/// What the client was told.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// The allocation is booked on this agent.
    Granted { agent: String },
    /// The release was done (`true`) or found nothing to release (`false`).
    Released(bool),
    /// A typed error: nothing was done by this attempt.
    Refused(String),
    /// No answer (a timeout, or the service unreachable mid-request): it may
    /// have been done or not.
    Indeterminate,
}

/// One request and its answer, times in µs since the epoch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Attempt {
    pub client: usize,
    pub op: Op,
    pub invoked_us: u64,
    pub completed_us: u64,
    pub outcome: Outcome,
}

/// One agent record as it was stored: capacity, and what each live allocation
/// holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Record {
    pub capacity: BTreeMap<String, f64>,
    pub allocations: BTreeMap<String, BTreeMap<String, f64>>,
}

/// One revision of the agents bucket (`None`: the key was deleted), with the
/// time the server stored it, in µs since the epoch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Revision {
    pub revision: u64,
    pub at_us: u64,
    pub agent: String,
    pub record: Option<Record>,
}

/// What a consistent history amounts to.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Summary {
    pub revisions: usize,
    /// Allocation ids that were ever booked.
    pub booked: usize,
    /// Live at the end, as the clients expect.
    pub live_at_end: usize,
    /// Ids whose last attempt got no answer (the client gave up): either end
    /// is accepted for them.
    pub unsettled: usize,
}

/// Where and when one allocation id was held: booked at `from`, removed at
/// `to` (revision, time), if it was.
#[derive(Debug, Clone)]
struct Held {
    agent: String,
    from: (u64, u64),
    to: Option<(u64, u64)>,
}

/// Checks `history` against `revisions`: every revision within capacity; no
/// id held twice at once or again after its removal; every grant stored
/// before it was acknowledged and held until a release was asked for; every
/// acknowledged release the one that removed it; the end state what the
/// clients were told. Returns the figures and every violation found.
pub(crate) fn check(history: &[Attempt], revisions: &[Revision]) -> (Summary, Vec<String>) {
    let mut errors = Vec::new();
    let mut revisions: Vec<&Revision> = revisions.iter().collect();
    revisions.sort_by_key(|r| r.revision);
    for pair in revisions.windows(2) {
        if pair[1].revision == pair[0].revision {
            errors.push(format!("revision {} given twice", pair[0].revision));
        } else if pair[1].revision != pair[0].revision + 1 {
            errors.push(format!(
                "revisions {}..{} missing: never checked",
                pair[0].revision + 1,
                pair[1].revision - 1
            ));
        }
    }

    // Replay the ledger.
    let mut live: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut held: BTreeMap<String, Vec<Held>> = BTreeMap::new();
    for rev in &revisions {
        let now = (rev.revision, rev.at_us);
        let ids: BTreeSet<String> = match &rev.record {
            Some(record) => {
                let mut total: BTreeMap<&str, f64> = BTreeMap::new();
                for resources in record.allocations.values() {
                    for (r, n) in resources {
                        *total.entry(r).or_default() += n;
                    }
                }
                for (r, n) in total {
                    let cap = record.capacity.get(r).copied().unwrap_or(0.0);
                    if n > cap + 1e-9 {
                        errors.push(format!(
                            "{} over capacity at revision {}: {r} {n} of {cap}",
                            rev.agent, rev.revision
                        ));
                    }
                }
                record.allocations.keys().cloned().collect()
            }
            None => BTreeSet::new(),
        };
        let before = live.remove(&rev.agent).unwrap_or_default();
        for gone in before.difference(&ids) {
            if let Some(h) = held.get_mut(gone).and_then(|h| h.last_mut()) {
                h.to = Some(now);
            }
        }
        for new in ids.difference(&before) {
            let spans = held.entry(new.clone()).or_default();
            match spans.last() {
                Some(h) if h.to.is_none() => errors.push(format!(
                    "{new} booked on {} at revision {} while held on {} since revision {}",
                    rev.agent, rev.revision, h.agent, h.from.0
                )),
                Some(h) => errors.push(format!(
                    "{new} booked again on {} at revision {} after its removal at revision {}",
                    rev.agent,
                    rev.revision,
                    h.to.map_or(0, |t| t.0)
                )),
                None => {}
            }
            spans.push(Held {
                agent: rev.agent.clone(),
                from: now,
                to: None,
            });
        }
        live.insert(rev.agent.clone(), ids);
    }

    // Hold every attempt against the ledger, id by id (one client drives each
    // id, one attempt at a time).
    let mut attempts: BTreeMap<&str, Vec<&Attempt>> = BTreeMap::new();
    for a in history {
        attempts.entry(a.op.id()).or_default().push(a);
    }
    let mut summary = Summary {
        revisions: revisions.len(),
        booked: held.len(),
        ..Summary::default()
    };
    let none = Vec::new();
    for (id, list) in &mut attempts {
        list.sort_by_key(|a| a.invoked_us);
        let spans = held.get(*id).unwrap_or(&none);
        let span = spans.first();
        // Present from before the attempt was sent until after it was answered.
        let throughout = |a: &Attempt| {
            span.is_some_and(|h| {
                h.from.1 < a.invoked_us && h.to.is_none_or(|(_, at)| at > a.completed_us)
            })
        };
        for a in list.iter() {
            match (&a.op, &a.outcome) {
                (Op::Allocate { .. }, Outcome::Granted { agent }) => match span {
                    None => errors.push(format!("{id} granted on {agent} but never stored")),
                    Some(h) if &h.agent != agent => {
                        errors.push(format!("{id} granted on {agent} but stored on {}", h.agent))
                    }
                    Some(h) if h.from.1 > a.completed_us => errors.push(format!(
                        "{id} granted before it was stored (revision {})",
                        h.from.0
                    )),
                    Some(_) => {}
                },
                (Op::Allocate { .. }, Outcome::Refused(code)) if throughout(a) => errors.push(
                    format!("{id} refused ({code}) while it was booked: a retry must get it back"),
                ),
                (Op::Release { .. }, Outcome::Released(true)) => match span.and_then(|h| h.to) {
                    Some((_, at)) if at >= a.invoked_us && at <= a.completed_us => {}
                    Some((rev, _)) => errors.push(format!(
                        "{id} released, but removed at revision {rev}, outside the release"
                    )),
                    None => errors.push(format!("{id} released, but nothing was removed")),
                },
                (Op::Release { .. }, Outcome::Released(false)) if throughout(a) => errors.push(
                    format!("{id} release found nothing, but it was held all along"),
                ),
                _ => {}
            }
        }
        if let Some(h) = span {
            // Booked by a request that was not refused, sent before it.
            let asked = list.iter().any(|a| {
                matches!(a.op, Op::Allocate { .. })
                    && a.invoked_us <= h.from.1
                    && !matches!(a.outcome, Outcome::Refused(_))
            });
            if !asked {
                errors.push(format!(
                    "{id} booked at revision {} with no request that could have booked it",
                    h.from.0
                ));
            }
            // Removed only once a release was asked for: else it was lost.
            if let Some((rev, at)) = h.to {
                let released = list
                    .iter()
                    .any(|a| matches!(a.op, Op::Release { .. }) && a.invoked_us <= at);
                if !released {
                    errors.push(format!(
                        "{id} lost: removed at revision {rev} with no release asked for"
                    ));
                }
            }
        }
        // The end: held if and only if the last answer that settled it says so.
        let last = list
            .iter()
            .rev()
            .find(|a| !matches!(a.outcome, Outcome::Indeterminate));
        let unsettled = list
            .last()
            .is_some_and(|a| a.outcome == Outcome::Indeterminate);
        let live_now = spans.last().is_some_and(|h| h.to.is_none());
        if unsettled {
            summary.unsettled += 1;
            continue;
        }
        let expected = matches!(last.map(|a| &a.outcome), Some(Outcome::Granted { .. }));
        summary.live_at_end += usize::from(expected);
        if expected && !live_now {
            errors.push(format!(
                "{id} granted and never released, but gone at the end"
            ));
        }
        if !expected && live_now {
            errors.push(format!(
                "{id} still booked at the end after the client was told it was not (last: {:?})",
                last.map(|a| &a.outcome)
            ));
        }
    }
    for id in held.keys() {
        if !attempts.contains_key(id.as_str()) {
            errors.push(format!("{id} booked but never asked for"));
        }
    }
    (summary, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cap: f64, allocs: &[(&str, f64)]) -> Option<Record> {
        Some(Record {
            capacity: [("cpu".to_string(), cap)].into(),
            allocations: allocs
                .iter()
                .map(|(id, n)| (id.to_string(), [("cpu".to_string(), *n)].into()))
                .collect(),
        })
    }

    /// Revisions of agents at times 10, 20, 30, … (revision n at 10·n µs).
    fn revs(list: &[(&str, Option<Record>)]) -> Vec<Revision> {
        list.iter()
            .enumerate()
            .map(|(i, (agent, record))| Revision {
                revision: i as u64 + 1,
                at_us: 10 * (i as u64 + 1),
                agent: agent.to_string(),
                record: record.clone(),
            })
            .collect()
    }

    fn alloc(id: &str, t: (u64, u64), outcome: Outcome) -> Attempt {
        Attempt {
            client: 0,
            op: Op::Allocate { id: id.into() },
            invoked_us: t.0,
            completed_us: t.1,
            outcome,
        }
    }

    fn release(id: &str, t: (u64, u64), outcome: Outcome) -> Attempt {
        Attempt {
            client: 0,
            op: Op::Release { id: id.into() },
            invoked_us: t.0,
            completed_us: t.1,
            outcome,
        }
    }

    fn granted(agent: &str) -> Outcome {
        Outcome::Granted {
            agent: agent.into(),
        }
    }

    fn errors(history: &[Attempt], revisions: &[Revision]) -> Vec<String> {
        check(history, revisions).1
    }

    /// Agent `a` (2 cpu) registered at revision 1 (10 µs); `x` booked at
    /// revision 2 (20 µs) and released at revision 3 (30 µs); `y` booked at
    /// revision 4 (40 µs) and kept.
    fn good() -> (Vec<Attempt>, Vec<Revision>) {
        let revisions = revs(&[
            ("a", record(2.0, &[])),
            ("a", record(2.0, &[("x", 1.0)])),
            ("a", record(2.0, &[])),
            ("a", record(2.0, &[("y", 2.0)])),
        ]);
        let history = vec![
            alloc("x", (15, 22), granted("a")),
            release("x", (25, 32), Outcome::Released(true)),
            alloc("y", (35, 45), granted("a")),
            alloc("z", (46, 50), Outcome::Refused("no_capacity".into())),
        ];
        (history, revisions)
    }

    #[test]
    fn a_consistent_history_passes() {
        let (history, revisions) = good();
        let (summary, violations) = check(&history, &revisions);
        assert_eq!(violations, Vec::<String>::new());
        assert_eq!(
            summary,
            Summary {
                revisions: 4,
                booked: 2,
                live_at_end: 1,
                unsettled: 0
            }
        );
    }

    #[test]
    fn an_indeterminate_attempt_may_go_either_way_if_settled_consistently() {
        let (mut history, revisions) = good();
        // x: the first try timed out (it booked), the retry got it back.
        history[0] = alloc("x", (12, 25), Outcome::Indeterminate);
        history.insert(1, alloc("x", (26, 27), granted("a")));
        history[2] = release("x", (28, 35), Outcome::Released(true));
        // w: timed out and never booked; the client released it to be sure.
        history.push(alloc("w", (50, 60), Outcome::Indeterminate));
        history.push(alloc("w", (61, 62), Outcome::Refused("no_capacity".into())));
        history.push(release("w", (63, 64), Outcome::Released(false)));
        let (summary, violations) = check(&history, &revisions);
        assert_eq!(violations, Vec::<String>::new());
        assert_eq!(summary.live_at_end, 1);
    }

    #[test]
    fn over_capacity_is_caught() {
        let (history, mut revisions) = good();
        revisions[3].record = record(2.0, &[("y", 2.5)]);
        let e = errors(&history, &revisions);
        assert!(
            e.iter().any(|e| e.contains("over capacity at revision 4")),
            "{e:?}"
        );
    }

    #[test]
    fn a_grant_never_stored_is_caught() {
        let (mut history, revisions) = good();
        history.push(alloc("v", (50, 60), granted("a")));
        let e = errors(&history, &revisions);
        assert!(
            e.iter()
                .any(|e| e.contains("v granted on a but never stored")),
            "{e:?}"
        );
    }

    #[test]
    fn a_grant_acknowledged_before_it_was_stored_is_caught() {
        let (mut history, revisions) = good();
        history[2] = alloc("y", (35, 38), granted("a"));
        let e = errors(&history, &revisions);
        assert!(
            e.iter().any(|e| e.contains("granted before it was stored")),
            "{e:?}"
        );
    }

    #[test]
    fn an_allocation_removed_without_a_release_is_lost() {
        let (mut history, mut revisions) = good();
        revisions.push(Revision {
            revision: 5,
            at_us: 70,
            agent: "a".into(),
            record: record(2.0, &[]),
        });
        let e = errors(&history, &revisions);
        assert!(e.iter().any(|e| e.contains("y lost")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("gone at the end")), "{e:?}");
        // A release asked for (even unanswered) accounts for the removal.
        history.push(release("y", (65, 80), Outcome::Indeterminate));
        assert_eq!(check(&history, &revisions).1, Vec::<String>::new());
    }

    #[test]
    fn a_booking_on_two_agents_at_once_is_caught() {
        let (history, mut revisions) = good();
        revisions.push(Revision {
            revision: 5,
            at_us: 50,
            agent: "b".into(),
            record: record(2.0, &[("y", 1.0)]),
        });
        let e = errors(&history, &revisions);
        assert!(
            e.iter()
                .any(|e| e.contains("y booked on b at revision 5 while held on a")),
            "{e:?}"
        );
    }

    #[test]
    fn an_allocation_back_after_its_release_is_caught() {
        let (history, mut revisions) = good();
        revisions.push(Revision {
            revision: 5,
            at_us: 50,
            agent: "a".into(),
            record: record(3.0, &[("y", 2.0), ("x", 1.0)]),
        });
        let e = errors(&history, &revisions);
        assert!(
            e.iter()
                .any(|e| e.contains("x booked again on a at revision 5 after its removal")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.contains("x still booked at the end")),
            "{e:?}"
        );
    }

    #[test]
    fn a_release_that_removed_nothing_is_caught() {
        let (mut history, revisions) = good();
        // y is held all along, yet the release says it did it.
        history.push(release("y", (50, 60), Outcome::Released(true)));
        let e = errors(&history, &revisions);
        assert!(
            e.iter().any(|e| e.contains("y released, but nothing")),
            "{e:?}"
        );
    }

    #[test]
    fn a_release_that_missed_a_held_allocation_is_caught() {
        let (mut history, revisions) = good();
        history.push(release("y", (50, 60), Outcome::Released(false)));
        let e = errors(&history, &revisions);
        assert!(
            e.iter()
                .any(|e| e.contains("y release found nothing, but it was held all along")),
            "{e:?}"
        );
    }

    #[test]
    fn a_refusal_of_a_booked_id_is_caught() {
        let (mut history, revisions) = good();
        history.push(alloc("y", (50, 60), Outcome::Refused("no_capacity".into())));
        let e = errors(&history, &revisions);
        assert!(
            e.iter()
                .any(|e| e.contains("y refused (no_capacity) while it was booked")),
            "{e:?}"
        );
    }

    #[test]
    fn a_booking_nobody_asked_for_or_that_was_refused_is_caught() {
        let (mut history, mut revisions) = good();
        revisions.push(Revision {
            revision: 5,
            at_us: 50,
            agent: "a".into(),
            record: record(2.0, &[("y", 1.0), ("q", 0.5)]),
        });
        let e = errors(&history, &revisions);
        assert!(
            e.iter().any(|e| e.contains("q booked but never asked for")),
            "{e:?}"
        );
        // z was refused, yet it is booked and still there at the end.
        revisions[4].record = record(2.0, &[("y", 1.0), ("z", 0.5)]);
        history.push(alloc("z", (70, 80), Outcome::Refused("no_capacity".into())));
        let e = errors(&history, &revisions);
        assert!(
            e.iter()
                .any(|e| e.contains("z booked at revision 5 with no request")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.contains("z still booked at the end")),
            "{e:?}"
        );
    }

    #[test]
    fn unseen_revisions_are_caught() {
        let (history, mut revisions) = good();
        revisions.remove(2);
        let e = errors(&history, &revisions);
        assert!(
            e.iter().any(|e| e.contains("revisions 3..3 missing")),
            "{e:?}"
        );
    }
}
