//! Placement: filter by status, capabilities, labels and anti-affinity, then
//! choose by policy; gangs all-or-nothing; reservations over a window; and the
//! capacity report that says where requirements would go.

use std::collections::BTreeMap;

use common::msg::{CapacityStatus, NoFit, Policy, Requirements, ResourceCapacity, Unfit};
use common::AllocationId;

use super::{new_allocation, AgentRecord, Draw, EPS};
use common::msg::Allocation;

/// An agent `req` fits on, and where it would draw from.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub agent: &'a AgentRecord,
    pub draw: Draw,
    score: f64,
}

impl Candidate<'_> {
    /// Ordering key: an owner's own reservation first, then the policy's
    /// preference, then the agent id so the choice is deterministic.
    fn better_than(&self, other: &Candidate<'_>, policy: Policy) -> bool {
        let general = |c: &Candidate<'_>| c.draw == Draw::General;
        let by_draw = general(self).cmp(&general(other));
        let by_score = match policy {
            Policy::BestFit => self.score.total_cmp(&other.score),
            Policy::Spread => other.score.total_cmp(&self.score),
        };
        by_draw
            .then(by_score)
            .then_with(|| self.agent.agent_id.cmp(&other.agent.agent_id))
            .is_lt()
    }
}

fn candidate<'a>(
    agent: &'a AgentRecord,
    req: &Requirements,
    owner: Option<&str>,
    now_ms: u64,
) -> Option<Candidate<'a>> {
    let draw = agent.fit(req, owner, now_ms).ok()?;
    Some(Candidate {
        agent,
        draw,
        score: agent.leftover(req, now_ms),
    })
}

/// Every agent `req` fits on now, best first by `req.policy`.
pub fn candidates<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord>,
    req: &Requirements,
    owner: Option<&str>,
    now_ms: u64,
) -> Vec<Candidate<'a>> {
    let mut fit: Vec<Candidate<'a>> = agents
        .into_iter()
        .filter_map(|a| candidate(a, req, owner, now_ms))
        .collect();
    fit.sort_by(|a, b| {
        if a.better_than(b, req.policy) {
            std::cmp::Ordering::Less
        } else if b.better_than(a, req.policy) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    fit
}

/// Agents `req` fits on, in no particular order; in a pool larger than
/// `enough`, only the first `enough` found scanning from `start` (callers
/// rotate it, so requests look at different parts of the pool). As with
/// Kubernetes' share of nodes to score, the best of a large sample is nearly
/// the best of all, and a placement then costs the same among ten thousand
/// agents as among a hundred. An owner's reservation outranks any general
/// fit and may sit on any agent, so a pool holding reservations is scanned
/// in full.
pub fn sample<'a>(
    agents: &[&'a AgentRecord],
    req: &Requirements,
    owner: Option<&str>,
    now_ms: u64,
    start: usize,
    enough: usize,
) -> Vec<Candidate<'a>> {
    let n = agents.len();
    let full = n <= enough || agents.iter().any(|a| !a.reservations.is_empty());
    let mut found = Vec::new();
    for i in 0..n {
        if let Some(c) = candidate(agents[(start + i) % n], req, owner, now_ms) {
            found.push(c);
            if !full && found.len() >= enough {
                break;
            }
        }
    }
    found
}

/// The best of `found` by `policy`, and the others best first.
pub fn rank(mut found: Vec<Candidate<'_>>, policy: Policy) -> Vec<Candidate<'_>> {
    found.sort_by(|a, b| {
        if a.better_than(b, policy) {
            std::cmp::Ordering::Less
        } else if b.better_than(a, policy) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    found
}

/// Why `req` fits on none of `agents` (see [`place`]).
pub fn why_not<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord>,
    req: &Requirements,
    owner: Option<&str>,
    now_ms: u64,
) -> Box<NoFit> {
    no_fit(agents, |a| a.fit(req, owner, now_ms).err())
}

/// Chooses where `req` goes for `owner`, or says why it cannot go anywhere.
/// One pass over the agents: no sorting on the hot path.
pub fn place<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord> + Clone,
    req: &Requirements,
    owner: Option<&str>,
    now_ms: u64,
) -> Result<Candidate<'a>, Box<NoFit>> {
    let mut best: Option<Candidate<'a>> = None;
    for a in agents.clone() {
        if let Some(c) = candidate(a, req, owner, now_ms) {
            if best.as_ref().is_none_or(|b| c.better_than(b, req.policy)) {
                best = Some(c);
            }
        }
    }
    best.ok_or_else(|| no_fit(agents, |a| a.fit(req, owner, now_ms).err()))
}

/// Why nothing fits: among agents that qualify by status, capabilities, labels
/// and anti-affinity, the one short by the least; when none qualifies, every
/// distinct reason with how many agents it stops, and as `short` the one
/// most worth acting on (see [`closeness`]).
fn no_fit<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord>,
    why: impl Fn(&AgentRecord) -> Option<Unfit>,
) -> Box<NoFit> {
    let mut considered = 0;
    let mut reasons: Vec<(Unfit, usize)> = Vec::new();
    let mut closest: Option<(&AgentRecord, Unfit, f64)> = None;
    // Every agent, to tell "short" from "nobody has it".
    let mut seen: Vec<&AgentRecord> = Vec::new();
    for a in agents {
        considered += 1;
        seen.push(a);
        match why(a) {
            Some(u @ Unfit::Short { .. }) => {
                let gap = match &u {
                    Unfit::Short { needed, free, .. } => needed - free,
                    _ => f64::INFINITY,
                };
                let closer = closest.as_ref().is_none_or(|(b, _, g)| {
                    gap.total_cmp(g)
                        .then_with(|| a.agent_id.cmp(&b.agent_id))
                        .is_lt()
                });
                if closer {
                    closest = Some((a, u, gap));
                }
            }
            Some(other) => match reasons.iter_mut().find(|(r, _)| *r == other) {
                Some((_, n)) => *n += 1,
                None => reasons.push((other, 1)),
            },
            None => {}
        }
    }
    let message = match (&closest, considered) {
        (_, 0) => "no agent is registered".to_owned(),
        (
            Some((
                a,
                Unfit::Short {
                    resource,
                    needed,
                    free,
                },
                _,
            )),
            _,
        ) => {
            let anywhere = seen
                .iter()
                .any(|h| h.capacity.get(resource).is_some_and(|c| *c > EPS));
            if anywhere {
                format!(
                    "{resource} is short: needs {needed}, best candidate {} has {free} free",
                    a.agent_id
                )
            } else {
                format!("no agent has resource {resource} (needs {needed})")
            }
        }
        _ => {
            let all: Vec<String> = reasons
                .iter()
                .map(|(u, n)| format!("{n} {}", describe(u, *n)))
                .collect();
            format!("no agent takes these requirements: {}", all.join("; "))
        }
    };
    let (best_candidate, short) = match closest {
        Some((a, u, _)) => (Some(a.agent_id.clone()), Some(u)),
        None => (
            None,
            reasons.into_iter().map(|(u, _)| u).max_by_key(closeness),
        ),
    };
    Box::new(NoFit {
        message,
        best_candidate,
        short,
        agents_considered: considered,
        member: None,
    })
}

/// How close an agent stopped by `u` is to taking the requirements: one
/// that lacks a capability or label never will; a draining one would but
/// for its status; one already holding the anti-affinity group qualifies
/// in every other way.
fn closeness(u: &Unfit) -> u8 {
    match u {
        Unfit::Unknown => 0,
        Unfit::MissingCapability { .. } => 1,
        Unfit::LabelMismatch { .. } => 2,
        Unfit::NotAccepting { .. } => 3,
        Unfit::AntiAffinity { .. } => 4,
        Unfit::Short { .. } => 5,
    }
}

/// `u` for a count of `n` agents ("2 are draining", "1 lacks capability gpu").
fn describe(u: &Unfit, n: usize) -> String {
    let one = n == 1;
    let (is, has, lacks, holds) = if one {
        ("is", "has", "lacks", "holds")
    } else {
        ("are", "have", "lack", "hold")
    };
    match u {
        Unfit::NotAccepting { status } => format!("{is} {status}"),
        Unfit::MissingCapability { capability } => format!("{lacks} capability {capability}"),
        Unfit::LabelMismatch { label, want, have } => match have {
            Some(h) => format!("{has} label {label}={h}, not {want}"),
            None => format!("{lacks} label {label}={want}"),
        },
        Unfit::AntiAffinity { group } => {
            format!("already {holds} anti-affinity group {group}")
        }
        Unfit::Short { resource, .. } => format!("{is} short of {resource}"),
        Unfit::Unknown => format!("{is} unsuitable for a reason this build does not know"),
    }
}

/// Places every member of a gang or none: members go in order of size (largest
/// first packs better), each on the ledger as the previous ones left it.
/// `ids` gives one fresh id per member; the result is in member order, every
/// allocation marked pending under `gang_id` until the adapter confirms it.
pub fn place_gang(
    agents: &[AgentRecord],
    members: &[Requirements],
    owner: &str,
    priority: i32,
    ids: &[AllocationId],
    gang_id: &str,
    now_ms: u64,
) -> Result<Vec<Allocation>, Box<NoFit>> {
    let mut work: Vec<AgentRecord> = agents.to_vec();
    let mut order: Vec<usize> = (0..members.len()).collect();
    let size = |r: &Requirements| r.resources.values().sum::<f64>();
    order.sort_by(|a, b| {
        size(&members[*b])
            .total_cmp(&size(&members[*a]))
            .then(a.cmp(b))
    });
    let mut placed: Vec<Option<Allocation>> = vec![None; members.len()];
    for i in order {
        let req = &members[i];
        let Some(id) = ids.get(i) else {
            return Err(Box::new(NoFit {
                message: "one id per member is needed".into(),
                best_candidate: None,
                short: None,
                agents_considered: 0,
                member: Some(i),
            }));
        };
        let (index, draw) = match place(work.iter(), req, Some(owner), now_ms) {
            Ok(c) => {
                let index = work
                    .iter()
                    .position(|a| a.agent_id == c.agent.agent_id)
                    .unwrap_or(0);
                (index, c.draw)
            }
            Err(mut nofit) => {
                nofit.member = Some(i);
                nofit.message = format!("gang member {i}: {}", nofit.message);
                return Err(nofit);
            }
        };
        let Some(agent) = work.get_mut(index) else {
            continue;
        };
        let alloc = new_allocation(
            id.clone(),
            &agent.agent_id,
            owner,
            req,
            priority,
            draw,
            now_ms,
            Some(gang_id),
        );
        agent
            .allocations
            .insert(alloc.allocation_id.clone(), alloc.clone());
        placed[i] = Some(alloc);
    }
    Ok(placed.into_iter().flatten().collect())
}

/// Chooses the agent for a reservation of `req` over `[start_ms, end_ms)`:
/// the tightest fit over the window, or why none has room.
pub fn place_reservation<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord> + Clone,
    req: &Requirements,
    start_ms: u64,
    end_ms: u64,
    now_ms: u64,
) -> Result<&'a AgentRecord, Box<NoFit>> {
    let from = start_ms.max(now_ms);
    let score = |a: &AgentRecord| {
        req.resources
            .iter()
            .map(|(r, need)| {
                let cap = a.capacity.get(r).copied().unwrap_or(0.0);
                let free = cap - a.general_used(r) - a.reserved_peak_within(r, from, end_ms);
                if cap <= EPS {
                    0.0
                } else {
                    (free - need) / cap
                }
            })
            .fold(f64::INFINITY, f64::min)
    };
    agents
        .clone()
        .into_iter()
        .filter(|a| a.fit_reservation(req, start_ms, end_ms, now_ms).is_ok())
        .min_by(|a, b| {
            let (x, y) = (score(a), score(b));
            match req.policy {
                Policy::BestFit => x.total_cmp(&y),
                Policy::Spread => y.total_cmp(&x),
            }
            .then_with(|| a.agent_id.cmp(&b.agent_id))
        })
        .ok_or_else(|| {
            no_fit(agents, |a| {
                a.fit_reservation(req, start_ms, end_ms, now_ms).err()
            })
        })
}

fn add(into: &mut BTreeMap<String, ResourceCapacity>, usage: &BTreeMap<String, ResourceCapacity>) {
    for (r, u) in usage {
        let p = into.entry(r.clone()).or_default();
        p.capacity += u.capacity;
        p.allocated += u.allocated;
        p.reserved += u.reserved;
        p.free += u.free;
    }
}

/// The capacity report over a set of agents, with where `req` would fit for
/// `owner` and, if nowhere, what is short.
pub fn capacity_status<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord> + Clone,
    req: Option<&Requirements>,
    owner: Option<&str>,
    now_ms: u64,
) -> CapacityStatus {
    let mut status = CapacityStatus::default();
    for a in agents.clone() {
        let usage = a.usage(now_ms);
        if a.accepts_placements() {
            add(&mut status.pool, &usage);
            for (k, v) in &a.labels {
                add(status.labels.entry(format!("{k}={v}")).or_default(), &usage);
            }
        }
        status.agents.insert(a.agent_id.clone(), usage);
        status.agent_status.insert(a.agent_id.clone(), a.status);
    }
    if let Some(req) = req {
        status.candidates = candidates(agents.clone(), req, owner, now_ms)
            .into_iter()
            .map(|c| c.agent.agent_id.clone())
            .collect();
        status.eligible = agents
            .clone()
            .into_iter()
            .filter(|a| a.could_take(req))
            .map(|a| a.agent_id.clone())
            .collect();
        status.fits = Some(!status.candidates.is_empty());
        if status.candidates.is_empty() {
            status.no_fit = Some(*no_fit(agents, |a| a.fit(req, owner, now_ms).err()));
        }
    }
    status
}
