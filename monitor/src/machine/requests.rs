//! Request traffic, from what the services count themselves.
//!
//! The monitor holds no subscription on a request subject: one would count as
//! interest, and a request to a service that is down would wait out its
//! timeout instead of failing at once with "no responders". Instead, every
//! replica's `$SRV.STATS` answer says how many requests each of its endpoints
//! has taken since it started; what an endpoint took between two answers is
//! the difference.
//!
//! Replicas that answered the first answers seen are the baseline: what they
//! took before then happened before the monitor was watching. A replica first
//! seen later started since, so all it took is new (a replica too slow to
//! answer the first poll is counted from its own start, once).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// Endpoints of replicas remembered at most; beyond it the longest unseen
/// (replicas that are gone) are forgotten.
pub const MAX_ENDPOINTS: usize = 4_096;

#[derive(Debug, Clone, Default)]
struct Seen {
    requests: u64,
    poll: u64,
}

/// The last request count of every endpoint of every replica.
#[derive(Debug, Clone, Default)]
pub struct Requests {
    /// Keyed by `{replica id} {endpoint subject}`.
    seen: HashMap<String, Seen>,
    polls: u64,
}

impl Requests {
    /// Requests per endpoint subject since the previous answers, from one
    /// gather of `$SRV.STATS` answers. Subjects outside `coord.` are not
    /// coordkit's and are left out. Answers may come in any order from
    /// concurrent gathers: a count lower than one already seen adds nothing.
    pub fn observe(&mut self, stats: &[Value]) -> BTreeMap<String, u64> {
        let baseline = self.polls == 0;
        self.polls += 1;
        let mut out = BTreeMap::new();
        for st in stats {
            let Some(id) = st.get("id").and_then(Value::as_str) else {
                continue;
            };
            for e in st
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(subject) = e.get("subject").and_then(Value::as_str) else {
                    continue;
                };
                if !subject.starts_with("coord.") {
                    continue;
                }
                let n = e.get("num_requests").and_then(Value::as_u64).unwrap_or(0);
                let key = format!("{id} {subject}");
                let new = match self.seen.get_mut(&key) {
                    Some(s) => {
                        s.poll = self.polls;
                        let new = n.saturating_sub(s.requests);
                        s.requests = s.requests.max(n);
                        new
                    }
                    None => {
                        self.make_room();
                        self.seen.insert(
                            key,
                            Seen {
                                requests: n,
                                poll: self.polls,
                            },
                        );
                        if baseline {
                            0
                        } else {
                            n
                        }
                    }
                };
                if new > 0 {
                    *out.entry(subject.to_owned()).or_insert(0) += new;
                }
            }
        }
        out
    }

    /// Forgets the sixteenth of the endpoints seen longest ago when full, so
    /// eviction is amortised rather than a scan per new endpoint.
    fn make_room(&mut self) {
        if self.seen.len() < MAX_ENDPOINTS {
            return;
        }
        let mut polls: Vec<u64> = self.seen.values().map(|s| s.poll).collect();
        let cut = (MAX_ENDPOINTS / 16).min(polls.len() - 1);
        let (_, nth, _) = polls.select_nth_unstable(cut);
        let limit = *nth;
        self.seen.retain(|_, s| s.poll > limit);
    }

    /// Endpoints remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stats(id: &str, endpoints: &[(&str, u64)]) -> Value {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(s, n)| json!({"name": s.replace('.', "-"), "subject": s, "num_requests": n}))
            .collect();
        json!({"name": "svc", "id": id, "endpoints": endpoints})
    }

    #[test]
    fn counts_growth_between_answers_after_a_baseline() {
        let mut r = Requests::default();
        let first = r.observe(&[stats("o1", &[("coord.orchestrator.flow.create", 7)])]);
        assert!(
            first.is_empty(),
            "taken before the monitor watched: {first:?}"
        );
        let next = r.observe(&[
            stats("o1", &[("coord.orchestrator.flow.create", 10)]),
            stats("o2", &[("coord.orchestrator.flow.create", 4)]),
            stats("s1", &[("coord.agents.*.state.get", 2), ("$SRV.X", 9)]),
        ]);
        assert_eq!(next["coord.orchestrator.flow.create"], 3 + 4);
        assert_eq!(next["coord.agents.*.state.get"], 2);
        assert_eq!(next.len(), 2, "{next:?}");
        // An older answer arriving late adds nothing, nor does a repeat.
        let late = r.observe(&[stats("o1", &[("coord.orchestrator.flow.create", 9)])]);
        assert!(late.is_empty(), "{late:?}");
        let same = r.observe(&[stats("o1", &[("coord.orchestrator.flow.create", 10)])]);
        assert!(same.is_empty(), "{same:?}");
        let more = r.observe(&[stats("o1", &[("coord.orchestrator.flow.create", 12)])]);
        assert_eq!(more["coord.orchestrator.flow.create"], 2);
    }

    #[test]
    fn memory_is_bounded_and_gone_replicas_are_forgotten_first() {
        let mut r = Requests::default();
        r.observe(&[stats("live", &[("coord.a", 1)])]);
        for i in 0..(MAX_ENDPOINTS + 100) {
            r.observe(&[
                stats(&format!("gone-{i}"), &[("coord.a", 1)]),
                stats("live", &[("coord.a", 1 + i as u64)]),
            ]);
        }
        assert!(r.len() <= MAX_ENDPOINTS, "{}", r.len());
        // The live replica is still known: its next answer counts only the growth.
        let n = r.observe(&[stats("live", &[("coord.a", MAX_ENDPOINTS as u64 + 101)])]);
        assert_eq!(n["coord.a"], 1);
    }
}
