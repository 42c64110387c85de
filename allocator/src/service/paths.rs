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
//! [`RECHECK_LISTENING_MS`] while it listens. A look waits out
//! [`NO_RESPONDERS_GRACE`] when the agent listens, so it holds a placement
//! up only when it must: when none of the agents the placement may choose
//! is known to listen. Otherwise it is made beside the placement, which
//! chooses among those known to listen: a new agent gets its first task
//! from a later placement, and one found listening before may still be
//! chosen while it is looked at again, as by any placement in the ten
//! seconds before; one found silent is left out from then on.

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

/// The looks one placement makes (see [`WorkPaths::plan`]).
#[derive(Debug, Default, PartialEq, Eq)]
struct Looks {
    /// Made beside the placement.
    aside: Vec<AgentId>,
    /// Made before it chooses.
    first: Vec<AgentId>,
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

    /// The looks a placement among `agents` makes: beside it, or first
    /// when none of them is known to listen or `beside` is false (at most
    /// [`LOOKS_PER_PLACEMENT`] of either kind; the rest wait for the next
    /// placement). Those looked at beside are marked as looked at now, so
    /// one look is under way per agent, and a new one counts as silent
    /// until its look says otherwise.
    fn plan<'a>(
        &self,
        agents: impl Iterator<Item = &'a AgentId>,
        now_ms: u64,
        beside: bool,
    ) -> Looks {
        let mut looks = Looks::default();
        let Ok(mut known) = self.known.lock() else {
            return looks;
        };
        let agents: Vec<&AgentId> = agents.collect();
        let any_listens = beside
            && agents
                .iter()
                .any(|a| known.get(*a).is_some_and(|(listens, _)| *listens));
        for agent in agents {
            let due = match known.get(agent) {
                Some((true, at)) => now_ms.saturating_sub(*at) >= RECHECK_LISTENING_MS,
                Some((false, at)) => now_ms.saturating_sub(*at) >= RECHECK_MS,
                None => true,
            };
            if !due {
                continue;
            }
            let to = if any_listens {
                &mut looks.aside
            } else {
                &mut looks.first
            };
            if to.len() >= LOOKS_PER_PLACEMENT {
                continue;
            }
            if any_listens {
                let listens = known.get(agent).is_some_and(|(listens, _)| *listens);
                known.insert(agent.clone(), (listens, now_ms));
            }
            to.push(agent.clone());
        }
        looks
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
    /// few per placement; the rest wait for the next placement): this is
    /// the last resort of a placement whose sampled candidates all proved
    /// silent, and `records` need not fit the task, so that others listen
    /// says nothing of whether the placement could do without the looks.
    pub(super) async fn with_work_path<'a>(
        &self,
        records: &[&'a AgentRecord],
        now_ms: u64,
    ) -> (Vec<&'a AgentRecord>, Vec<AgentId>) {
        let listening = self
            .listening(records.iter().map(|r| &r.agent_id), now_ms, false)
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
            .listening(found.iter().map(|c| &c.agent.agent_id), now_ms, true)
            .await;
        found
            .into_iter()
            .zip(listening)
            .filter_map(|(c, listens)| listens.then_some(c))
            .collect()
    }

    /// Whether each agent listens, after looking at a few of those due
    /// (beside the placement, when `beside` and one of them is known to
    /// listen; see [`WorkPaths::plan`]).
    async fn listening<'a>(
        &self,
        agents: impl ExactSizeIterator<Item = &'a AgentId> + Clone,
        now_ms: u64,
        beside: bool,
    ) -> Vec<bool> {
        let looks = self.paths.plan(agents.clone(), now_ms, beside);
        for agent in looks.aside {
            let (nats, paths) = (self.nats.clone(), self.paths.clone());
            tokio::spawn(async move { look_at(&nats, &paths, &agent).await });
        }
        if !looks.first.is_empty() {
            let first = looks.first.iter();
            futures::future::join_all(first.map(|a| look_at(&self.nats, &self.paths, a))).await;
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

    fn placeable(paths: &WorkPaths, agents: &[&AgentId], now: u64) -> Vec<bool> {
        let seen = paths.of(agents.iter().copied(), now);
        seen.into_iter().map(|p| p.listens).collect()
    }

    #[test]
    fn with_no_agent_known_to_listen_the_placement_waits_for_its_looks() {
        let paths = WorkPaths::default();
        let (new, off) = (id("new"), id("off"));
        paths.note(&off, false, 0);
        let looks = paths.plan([&new, &off].into_iter(), RECHECK_MS, true);
        assert_eq!(
            looks,
            Looks {
                aside: vec![],
                first: vec![new.clone(), off.clone()]
            }
        );
        // Nothing is marked: the placement's own looks will say.
        assert_eq!(
            paths.plan([&new].into_iter(), RECHECK_MS, true).first,
            vec![new]
        );
    }

    #[test]
    fn beside_an_agent_known_to_listen_looks_are_made_aside_once() {
        let paths = WorkPaths::default();
        let (on, new, off) = (id("on"), id("new"), id("off"));
        paths.note(&on, true, 0);
        paths.note(&off, false, 0);
        let now = RECHECK_LISTENING_MS;
        let all = || [&on, &new, &off].into_iter();
        let looks = paths.plan(all(), now, true);
        assert_eq!(
            looks,
            Looks {
                aside: vec![on.clone(), new.clone(), off.clone()],
                first: vec![]
            }
        );
        // The one that listens may still be chosen; the new one not until
        // its look finds it listening.
        assert_eq!(
            placeable(&paths, &[&on, &new, &off], now),
            [true, false, false]
        );
        // One look under way per agent.
        assert_eq!(paths.plan(all(), now, true), Looks::default());
        paths.note(&new, true, now);
        assert_eq!(
            placeable(&paths, &[&on, &new, &off], now),
            [true, true, false]
        );
    }

    #[test]
    fn the_last_resort_over_every_record_waits_for_its_looks() {
        let paths = WorkPaths::default();
        let (on, new) = (id("on"), id("new"));
        paths.note(&on, true, 0);
        // `on` may not fit the task: that it listens is no reason not to
        // wait for a look at `new`.
        let looks = paths.plan([&on, &new].into_iter(), 0, false);
        assert_eq!(
            looks,
            Looks {
                aside: vec![],
                first: vec![new]
            }
        );
    }

    #[test]
    fn an_agent_looked_at_lately_is_not_looked_at_again() {
        let paths = WorkPaths::default();
        let (on, off) = (id("on"), id("off"));
        paths.note(&on, true, 0);
        paths.note(&off, false, 0);
        let looks = paths.plan([&on, &off].into_iter(), RECHECK_MS - 1, true);
        assert_eq!(looks, Looks::default());
        let looks = paths.plan([&on, &off].into_iter(), RECHECK_LISTENING_MS - 1, true);
        assert_eq!(
            looks,
            Looks {
                aside: vec![off],
                first: vec![]
            }
        );
    }

    #[test]
    fn a_placement_makes_a_bounded_number_of_looks() {
        let paths = WorkPaths::default();
        let agents: Vec<AgentId> = (0..40).map(|i| id(&format!("a{i}"))).collect();
        let looks = paths.plan(agents.iter(), 0, true);
        assert_eq!(looks.first.len(), LOOKS_PER_PLACEMENT);
        paths.note(&agents[0], true, 0);
        let looks = paths.plan(agents.iter(), 0, true);
        assert_eq!(looks.aside.len(), LOOKS_PER_PLACEMENT);
        assert!(looks.first.is_empty());
    }
}
