//! What a put made from a stale revision turns into, under the scope's policy.
//!
//! The adapter has read the stored document (and, for `merge`, the base from
//! the key's history); this decides, and the adapter writes the outcome as a
//! compare-and-set on the revision it read. Losing that race means reading
//! again and deciding again.

use common::msg::{ConflictOutcome, ConflictPolicy, Hlc, MergeFallback, Resolution};
use serde_json::Value;

use super::hlc;
use super::merge::{self, Side};

/// The stored side of a conflict.
#[derive(Debug, Clone, PartialEq)]
pub struct Current<'a> {
    pub revision: u64,
    pub doc: &'a Value,
    pub hlc: Option<&'a Hlc>,
}

/// The incoming side.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming<'a> {
    pub expected_revision: u64,
    pub doc: &'a Value,
    pub hlc: &'a Hlc,
}

/// The base of a merge, as found in the key's history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Base<'a> {
    /// The document at the expected revision.
    Found(&'a Value),
    /// The expected revision was a deletion or the put was a create (`0`):
    /// the writer started from nothing.
    Empty,
    /// The revision is no longer in the history (it keeps at most 64 per key).
    AgedOut,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write `doc` stamped `hlc` against the current revision.
    Write {
        doc: Value,
        hlc: Hlc,
        resolution: Resolution,
    },
    /// Leave the stored document; the put is answered with it.
    Keep { resolution: Resolution },
    /// Refuse the put (`conflict` error carrying the resolution and current document).
    Reject { resolution: Resolution },
}

/// Resolves a put whose `expected_revision` is not the current one.
pub fn resolve(
    policy: ConflictPolicy,
    fallback: MergeFallback,
    current: &Current<'_>,
    incoming: &Incoming<'_>,
    base: Base<'_>,
) -> Decision {
    let resolution = |outcome, base_available, conflicts| Resolution {
        policy,
        outcome,
        expected_revision: incoming.expected_revision,
        current_revision: current.revision,
        base_available,
        conflicts,
    };
    let ours_later = hlc::later(incoming.hlc, current.hlc);
    match policy {
        ConflictPolicy::Reject => Decision::Reject {
            resolution: resolution(ConflictOutcome::Rejected, false, Vec::new()),
        },
        ConflictPolicy::Lww if ours_later => Decision::Write {
            doc: incoming.doc.clone(),
            hlc: incoming.hlc.clone(),
            resolution: resolution(ConflictOutcome::Overwritten, false, Vec::new()),
        },
        ConflictPolicy::Lww => Decision::Keep {
            resolution: resolution(ConflictOutcome::KeptCurrent, false, Vec::new()),
        },
        ConflictPolicy::Merge => {
            let prefer = match fallback {
                MergeFallback::Ours | MergeFallback::Reject => Side::Ours,
                MergeFallback::Theirs => Side::Theirs,
                MergeFallback::Lww if ours_later => Side::Ours,
                MergeFallback::Lww => Side::Theirs,
            };
            let empty = Value::Object(Default::default());
            let (base_doc, available) = match base {
                Base::Found(b) => (Some(b), true),
                Base::Empty => (Some(&empty), true),
                Base::AgedOut => (None, false),
            };
            let merged = merge::merge3(base_doc, current.doc, incoming.doc, prefer);
            let res = resolution(ConflictOutcome::Merged, available, merged.conflicts);
            if fallback == MergeFallback::Reject && !res.conflicts.is_empty() {
                return Decision::Reject {
                    resolution: Resolution {
                        outcome: ConflictOutcome::Rejected,
                        ..res
                    },
                };
            }
            // The merged revision descends from both sides, so its clock is the later one.
            let stamp = match current.hlc {
                Some(t) if t > incoming.hlc => t.clone(),
                _ => incoming.hlc.clone(),
            };
            Decision::Write {
                doc: merged.value,
                hlc: stamp,
                resolution: res,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn h(p: u64) -> Hlc {
        Hlc {
            physical_ms: p,
            logical: 0,
            node: "n".into(),
        }
    }

    #[test]
    fn each_policy_decides() {
        let stored = json!({"a": 1, "b": 1});
        let cur = Current {
            revision: 9,
            doc: &stored,
            hlc: Some(&h(10)),
        };
        let ours = json!({"a": 1, "b": 2});
        let early = h(5);
        let late = h(20);
        let inc = |hlc| Incoming {
            expected_revision: 4,
            doc: &ours,
            hlc,
        };
        assert!(matches!(
            resolve(
                ConflictPolicy::Reject,
                MergeFallback::Lww,
                &cur,
                &inc(&late),
                Base::AgedOut
            ),
            Decision::Reject { .. }
        ));
        assert!(matches!(
            resolve(
                ConflictPolicy::Lww,
                MergeFallback::Lww,
                &cur,
                &inc(&late),
                Base::AgedOut
            ),
            Decision::Write {
                resolution: Resolution {
                    outcome: ConflictOutcome::Overwritten,
                    ..
                },
                ..
            }
        ));
        assert!(matches!(
            resolve(
                ConflictPolicy::Lww,
                MergeFallback::Lww,
                &cur,
                &inc(&early),
                Base::AgedOut
            ),
            Decision::Keep { .. }
        ));
        let base = json!({"a": 0, "b": 1});
        match resolve(
            ConflictPolicy::Merge,
            MergeFallback::Lww,
            &cur,
            &inc(&early),
            Base::Found(&base),
        ) {
            Decision::Write {
                doc,
                hlc,
                resolution,
            } => {
                assert_eq!(doc, json!({"a": 1, "b": 2}));
                assert_eq!(hlc, h(10));
                assert!(resolution.base_available && resolution.conflicts.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn merge_fallbacks_on_a_leaf_changed_on_both_sides() {
        let base = json!({"x": 0});
        let stored = json!({"x": 1});
        let ours = json!({"x": 2});
        let cur = Current {
            revision: 3,
            doc: &stored,
            hlc: Some(&h(10)),
        };
        let late = h(20);
        let inc = Incoming {
            expected_revision: 1,
            doc: &ours,
            hlc: &late,
        };
        let pick = |f| match resolve(ConflictPolicy::Merge, f, &cur, &inc, Base::Found(&base)) {
            Decision::Write {
                doc, resolution, ..
            } => {
                assert_eq!(resolution.conflicts, vec!["/x"]);
                Some(doc)
            }
            Decision::Reject { resolution } => {
                assert_eq!(resolution.conflicts, vec!["/x"]);
                None
            }
            Decision::Keep { .. } => panic!("merge never keeps"),
        };
        assert_eq!(pick(MergeFallback::Lww), Some(json!({"x": 2})));
        assert_eq!(pick(MergeFallback::Ours), Some(json!({"x": 2})));
        assert_eq!(pick(MergeFallback::Theirs), Some(json!({"x": 1})));
        assert_eq!(pick(MergeFallback::Reject), None);
        // An aged-out base is reported, and the disagreement still surfaces.
        match resolve(
            ConflictPolicy::Merge,
            MergeFallback::Theirs,
            &cur,
            &inc,
            Base::AgedOut,
        ) {
            Decision::Write {
                doc, resolution, ..
            } => {
                assert!(!resolution.base_available);
                assert_eq!(
                    (doc, resolution.conflicts),
                    (json!({"x": 1}), vec!["/x".to_owned()])
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
