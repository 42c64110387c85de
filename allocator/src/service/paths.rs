//! Which agents have a work path: an assignment is a plain message on the
//! agent's `coord.agents.{id}.assign`, so it reaches an agent only while the
//! agent listens there. An agent that registered and heartbeats but does not
//! listen (a broken client, one that never subscribed) would look able to
//! work and never get any, so a task is placed only on an agent this replica
//! has found listening.
//!
//! Finding out costs one message, not a request that waits for a reply: an
//! empty message with the header [`subject::PROBE_HEADER`] and a reply
//! subject, followed by a flush. With nobody subscribed the server answers
//! "no responders" on the reply subject at once, ahead of the flush's PONG;
//! with a subscriber it answers nothing (the agent ignores the message, and
//! on an isolating server could not reply into this account anyway). An
//! agent is looked at when a placement would pick it and it is not known
//! yet, again [`RECHECK_MS`] after it was found silent, and again every
//! [`RECHECK_LISTENING_MS`] while it listens. Only the first two hold the
//! placement up (a look of one that listens waits out
//! [`NO_RESPONDERS_GRACE`]): an agent found listening is looked at again
//! beside the placement, which may still choose it, as any placement in
//! the ten seconds before could have; one found silent is left out from
//! the next placement on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use common::{subject, AgentId};
use futures::StreamExt;

use super::Allocator;
use crate::machine::{AgentRecord, Candidate};

/// How long an agent found silent is left out before it is looked at again.
pub(super) const RECHECK_MS: u64 = 500;
/// How often an agent found listening is looked at again.
pub(super) const RECHECK_LISTENING_MS: u64 = 10_000;
/// Agents looked at by one placement, at most.
const LOOKS_PER_PLACEMENT: usize = 16;
/// How long a look waits, after the flush, for a "no responders" the server
/// has already sent (it is in the client's hands by then; this only covers
/// the hand-over between the client's tasks).
const NO_RESPONDERS_GRACE: Duration = Duration::from_millis(5);

/// What this replica knows of the agents' listening.
#[derive(Default)]
pub(super) struct WorkPaths {
    /// Whether the agent listens, and when that was found.
    known: Mutex<HashMap<AgentId, (bool, u64)>>,
}

/// One agent as a placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Path {
    /// Found listening.
    listens: bool,
    /// Due to be looked at (not known yet, or known for long enough).
    look: bool,
}

impl WorkPaths {
    /// For each agent, under one lock: whether it may be placed on and
    /// whether it is to be looked at.
    fn of<'a>(&self, agents: impl ExactSizeIterator<Item = &'a AgentId>, now_ms: u64) -> Vec<Path> {
        let unknown = Path {
            listens: false,
            look: true,
        };
        let Ok(known) = self.known.lock() else {
            return vec![unknown; agents.len()];
        };
        let state = |agent: &AgentId| match known.get(agent) {
            Some((listens, at)) => {
                let every = if *listens {
                    RECHECK_LISTENING_MS
                } else {
                    RECHECK_MS
                };
                Path {
                    listens: *listens,
                    look: now_ms.saturating_sub(*at) >= every,
                }
            }
            None => unknown,
        };
        agents.map(state).collect()
    }

    /// Of `agents` found listening, those due to be looked at again, now
    /// marked as looked at (so that one look is under way per agent).
    fn recheck_due(&self, agents: impl Iterator<Item = AgentId>, now_ms: u64) -> Vec<AgentId> {
        let Ok(mut known) = self.known.lock() else {
            return Vec::new();
        };
        let mut due = Vec::new();
        for agent in agents {
            if let Some((true, at)) = known.get_mut(&agent) {
                if now_ms.saturating_sub(*at) >= RECHECK_LISTENING_MS {
                    *at = now_ms;
                    due.push(agent);
                }
            }
        }
        due
    }

    pub(super) fn note(&self, agent: &AgentId, listens: bool, now_ms: u64) {
        if let Ok(mut known) = self.known.lock() {
            known.insert(agent.clone(), (listens, now_ms));
        }
    }

    /// Forgets agents without a record.
    pub(super) fn retain(&self, keep: impl Fn(&AgentId) -> bool) {
        if let Ok(mut known) = self.known.lock() {
            known.retain(|a, _| keep(a));
        }
    }
}

impl Allocator {
    /// The records a task may be placed on: those of agents found listening,
    /// and the agents left out. Agents due a look are looked at first (a
    /// few per placement; the rest wait for the next placement).
    pub(super) async fn with_work_path<'a>(
        &self,
        records: &[&'a AgentRecord],
        now_ms: u64,
    ) -> (Vec<&'a AgentRecord>, Vec<AgentId>) {
        let listening = self
            .listening(records.iter().map(|r| &r.agent_id), now_ms)
            .await;
        let mut with = Vec::with_capacity(records.len());
        let mut without = Vec::new();
        for (r, listens) in records.iter().zip(listening) {
            if listens {
                with.push(*r);
            } else {
                without.push(r.agent_id.clone());
            }
        }
        (with, without)
    }

    /// Of the candidates a placement sampled, those whose agent listens (as
    /// [`Self::with_work_path`] decides): a placement among ten thousand
    /// agents looks at the few it sampled, not all of them.
    pub(super) async fn reachable<'a>(
        &self,
        found: Vec<Candidate<'a>>,
        now_ms: u64,
    ) -> Vec<Candidate<'a>> {
        let listening = self
            .listening(found.iter().map(|c| &c.agent.agent_id), now_ms)
            .await;
        found
            .into_iter()
            .zip(listening)
            .filter_map(|(c, listens)| listens.then_some(c))
            .collect()
    }

    /// Whether each agent listens, after looking at a few of those due.
    async fn listening<'a>(
        &self,
        agents: impl ExactSizeIterator<Item = &'a AgentId> + Clone,
        now_ms: u64,
    ) -> Vec<bool> {
        let (mut again, mut first) = (Vec::new(), Vec::new());
        for (agent, path) in agents.clone().zip(self.paths.of(agents.clone(), now_ms)) {
            if path.look {
                let to = if path.listens { &mut again } else { &mut first };
                to.push(agent.clone());
            }
        }
        // Listening agents due again are looked at beside the placement.
        for agent in self.paths.recheck_due(again.into_iter(), now_ms) {
            let (nats, paths) = (self.nats.clone(), self.paths.clone());
            tokio::spawn(async move { look_at(&nats, &paths, &agent).await });
        }
        first.truncate(LOOKS_PER_PLACEMENT);
        if !first.is_empty() {
            futures::future::join_all(first.iter().map(|a| look_at(&self.nats, &self.paths, a)))
                .await;
        }
        let paths = self.paths.of(agents, now_ms);
        paths.into_iter().map(|p| p.listens).collect()
    }
}

/// Looks at whether `agent` listens and notes it in `paths`; a look that
/// failed (this connection down) notes nothing.
async fn look_at(nats: &async_nats::Client, paths: &WorkPaths, agent: &AgentId) {
    let inbox = nats.new_inbox();
    let Ok(mut answers) = nats.subscribe(inbox.clone()).await else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(subject::PROBE_HEADER, "1");
    let to = subject::assign(agent);
    let sent = nats
        .publish_with_reply_and_headers(to, inbox, headers, Default::default())
        .await;
    if sent.is_err() || nats.flush().await.is_err() {
        return;
    }
    let silent = match tokio::time::timeout(NO_RESPONDERS_GRACE, answers.next()).await {
        Ok(Some(m)) => m.status == Some(StatusCode::NO_RESPONDERS),
        _ => false,
    };
    if silent {
        tracing::debug!(agent = %agent, "agent does not listen for assignments");
    }
    paths.note(agent, !silent, common::now_ms());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    #[test]
    fn a_listening_agent_due_again_stays_placeable_and_is_looked_at_once() {
        let paths = WorkPaths::default();
        let (on, off) = (id("on"), id("off"));
        paths.note(&on, true, 0);
        paths.note(&off, false, 0);
        let now = RECHECK_LISTENING_MS;
        let seen = paths.of([&on, &off].into_iter(), now);
        assert_eq!(
            seen,
            vec![
                Path {
                    listens: true,
                    look: true
                },
                Path {
                    listens: false,
                    look: true
                }
            ]
        );
        // Only the listening one is looked at beside the placement, and
        // once: the look under way counts as the latest.
        let both = || [on.clone(), off.clone()].into_iter();
        assert_eq!(paths.recheck_due(both(), now), vec![on.clone()]);
        assert!(paths.recheck_due(both(), now).is_empty());
        let seen = paths.of([&on].into_iter(), now);
        assert_eq!(
            seen,
            vec![Path {
                listens: true,
                look: false
            }]
        );
    }

    #[test]
    fn an_agent_not_yet_due_or_unknown_is_not_looked_at_beside_a_placement() {
        let paths = WorkPaths::default();
        let on = id("on");
        paths.note(&on, true, 0);
        let unknown = id("new");
        let due = paths.recheck_due(
            [on.clone(), unknown.clone()].into_iter(),
            RECHECK_LISTENING_MS - 1,
        );
        assert!(due.is_empty());
        assert_eq!(
            paths.of([&unknown].into_iter(), 0),
            vec![Path {
                listens: false,
                look: true
            }]
        );
    }
}
