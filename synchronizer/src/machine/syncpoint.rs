//! Sync point bookkeeping: choosing each participant's revision in a cut, and
//! completing a sync point from the acknowledgements that arrived.

use std::collections::BTreeMap;

use common::msg::{SyncPoint, SyncPointState, SyncPointSummary};
use common::AgentId;

/// The revision of a key as of stream sequence `sequence`: the latest of its
/// `revisions` (any order) at or below it. `None` when every known revision
/// is newer (the cut's revision aged out of the history) or there is none.
pub fn revision_at(revisions: &[u64], sequence: u64) -> Option<u64> {
    revisions.iter().copied().filter(|r| *r <= sequence).max()
}

/// Records a completion attempt: `completed` when every participant has
/// acknowledged, otherwise `incomplete` with the ones missing, sorted.
pub fn complete(sp: &mut SyncPoint, acked: &BTreeMap<AgentId, u64>, now_ms: u64) {
    for (agent, at) in acked {
        if sp.cut.contains_key(agent) {
            sp.acked.insert(agent.clone(), *at);
        }
    }
    sp.missing = sp
        .cut
        .keys()
        .filter(|a| !sp.acked.contains_key(*a))
        .cloned()
        .collect();
    if sp.missing.is_empty() {
        sp.state = SyncPointState::Completed;
        sp.completed_at_ms.get_or_insert(now_ms);
    } else {
        sp.state = SyncPointState::Incomplete;
    }
}

/// A sync point as listed.
pub fn summary(sp: &SyncPoint) -> SyncPointSummary {
    SyncPointSummary {
        id: sp.id.clone(),
        scope: sp.scope.clone(),
        label: sp.label.clone(),
        state: sp.state,
        sequence: sp.sequence,
        participants: sp.cut.len(),
        created_at_ms: sp.created_at_ms,
        rollbacks: sp.rollbacks.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::SyncPointId;

    #[test]
    fn the_cut_takes_the_latest_revision_at_or_below_the_sequence() {
        assert_eq!(revision_at(&[3, 9, 12], 10), Some(9));
        assert_eq!(revision_at(&[12, 3], 12), Some(12));
        assert_eq!(revision_at(&[12, 15], 10), None);
    }

    #[test]
    fn completion_names_who_did_not_acknowledge() {
        let a = |s: &str| AgentId::new(s).unwrap();
        let mut sp = SyncPoint {
            id: SyncPointId::new("sp").unwrap(),
            scope: Default::default(),
            label: String::new(),
            state: SyncPointState::Initiated,
            sequence: 10,
            cut: [(a("x"), 1), (a("y"), 2), (a("z"), 3)].into(),
            acked: Default::default(),
            missing: vec![],
            created_at_ms: 1,
            completed_at_ms: None,
            rollbacks: vec![],
        };
        complete(&mut sp, &[(a("x"), 5), (a("stranger"), 5)].into(), 7);
        assert_eq!(sp.state, SyncPointState::Incomplete);
        assert_eq!(sp.missing, vec![a("y"), a("z")]);
        complete(&mut sp, &[(a("y"), 6), (a("z"), 6)].into(), 8);
        assert_eq!(
            (sp.state, sp.completed_at_ms),
            (SyncPointState::Completed, Some(8))
        );
        assert!(sp.missing.is_empty() && !sp.acked.contains_key(&a("stranger")));
        assert_eq!(summary(&sp).participants, 3);
    }
}
