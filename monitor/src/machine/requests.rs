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

use common::ErrorCode;
use serde_json::Value;

/// Endpoints of replicas remembered at most; beyond it the longest unseen
/// (replicas that are gone) are forgotten.
pub const MAX_ENDPOINTS: usize = 4_096;

#[derive(Debug, Clone, Default)]
struct Seen {
    counts: Counts,
    poll: u64,
}

/// What one endpoint took: requests, failures (`num_errors`) and every error
/// reply by code (refusals included).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub failures: u64,
    /// Keyed by [`ErrorCode::as_str`]; a code this build does not know is `unknown`.
    pub errors_by_code: BTreeMap<&'static str, u64>,
}

impl Counts {
    fn read(e: &Value) -> Self {
        let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
        let mut errors_by_code = BTreeMap::new();
        for (code, k) in e
            .pointer("/data/errors_by_code")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let code = serde_json::from_value::<ErrorCode>(Value::String(code.clone()))
                .unwrap_or(ErrorCode::Unknown);
            *errors_by_code.entry(code.as_str()).or_default() += n(Some(k));
        }
        Counts {
            requests: n(e.get("num_requests")),
            failures: n(e.get("num_errors")),
            errors_by_code,
        }
    }

    /// What `self` took beyond `before`; a count lower than before adds nothing.
    fn since(&self, before: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(before.requests),
            failures: self.failures.saturating_sub(before.failures),
            errors_by_code: self
                .errors_by_code
                .iter()
                .map(|(c, n)| {
                    let was = before.errors_by_code.get(c).copied().unwrap_or(0);
                    (*c, n.saturating_sub(was))
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }

    /// The larger of each count.
    fn raise(&mut self, to: &Counts) {
        self.requests = self.requests.max(to.requests);
        self.failures = self.failures.max(to.failures);
        for (c, n) in &to.errors_by_code {
            let e = self.errors_by_code.entry(c).or_default();
            *e = (*e).max(*n);
        }
    }

    pub fn add(&mut self, more: &Counts) {
        self.requests += more.requests;
        self.failures += more.failures;
        for (c, n) in &more.errors_by_code {
            *self.errors_by_code.entry(c).or_default() += n;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requests == 0 && self.failures == 0 && self.errors_by_code.is_empty()
    }
}

/// What one gather of `$SRV.STATS` adds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// Requests per endpoint subject.
    pub by_subject: BTreeMap<String, u64>,
    /// Per `(service, endpoint name)`, over its replicas.
    pub by_endpoint: BTreeMap<(String, String), Counts>,
}

/// The last counts of every endpoint of every replica.
#[derive(Debug, Clone, Default)]
pub struct Requests {
    /// Keyed by `{replica id} {endpoint subject}`.
    seen: HashMap<String, Seen>,
    polls: u64,
}

impl Requests {
    /// What every endpoint took since the previous answers, from one gather
    /// of `$SRV.STATS` answers. Subjects outside `coord.` are not coordkit's
    /// and are left out. Answers may come in any order from concurrent
    /// gathers: a count lower than one already seen adds nothing.
    pub fn observe(&mut self, stats: &[Value]) -> Delta {
        let baseline = self.polls == 0;
        self.polls += 1;
        let mut out = Delta::default();
        for st in stats {
            let Some(id) = st.get("id").and_then(Value::as_str) else {
                continue;
            };
            let service = st.get("name").and_then(Value::as_str).unwrap_or("");
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
                let now = Counts::read(e);
                let key = format!("{id} {subject}");
                let new = match self.seen.get_mut(&key) {
                    Some(s) => {
                        s.poll = self.polls;
                        let new = now.since(&s.counts);
                        s.counts.raise(&now);
                        new
                    }
                    None => {
                        self.make_room();
                        let new = if baseline {
                            Counts::default()
                        } else {
                            now.clone()
                        };
                        self.seen.insert(
                            key,
                            Seen {
                                counts: now,
                                poll: self.polls,
                            },
                        );
                        new
                    }
                };
                if new.is_empty() {
                    continue;
                }
                if new.requests > 0 {
                    *out.by_subject.entry(subject.to_owned()).or_insert(0) += new.requests;
                }
                let endpoint = e.get("name").and_then(Value::as_str).unwrap_or(subject);
                out.by_endpoint
                    .entry((service.to_owned(), endpoint.to_owned()))
                    .or_default()
                    .add(&new);
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
        let first = r
            .observe(&[stats("o1", &[("coord.orchestrator.flow.create", 7)])])
            .by_subject;
        assert!(
            first.is_empty(),
            "taken before the monitor watched: {first:?}"
        );
        let next = r
            .observe(&[
                stats("o1", &[("coord.orchestrator.flow.create", 10)]),
                stats("o2", &[("coord.orchestrator.flow.create", 4)]),
                stats("s1", &[("coord.agents.*.state.get", 2), ("$SRV.X", 9)]),
            ])
            .by_subject;
        assert_eq!(next["coord.orchestrator.flow.create"], 3 + 4);
        assert_eq!(next["coord.agents.*.state.get"], 2);
        assert_eq!(next.len(), 2, "{next:?}");
        // An older answer arriving late adds nothing, nor does a repeat.
        let late = r
            .observe(&[stats("o1", &[("coord.orchestrator.flow.create", 9)])])
            .by_subject;
        assert!(late.is_empty(), "{late:?}");
        let same = r
            .observe(&[stats("o1", &[("coord.orchestrator.flow.create", 10)])])
            .by_subject;
        assert!(same.is_empty(), "{same:?}");
        let more = r
            .observe(&[stats("o1", &[("coord.orchestrator.flow.create", 12)])])
            .by_subject;
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
        let n = r
            .observe(&[stats("live", &[("coord.a", MAX_ENDPOINTS as u64 + 101)])])
            .by_subject;
        assert_eq!(n["coord.a"], 1);
    }

    #[test]
    fn failures_and_error_codes_are_counted_per_endpoint() {
        let ep = |n: u64, failures: u64, no_capacity: u64| {
            json!({"name": "svc", "id": "a1", "endpoints": [{
                "name": "allocator-allocate", "subject": "coord.allocator.allocate",
                "num_requests": n, "num_errors": failures,
                "data": {"errors_by_code": {"no_capacity": no_capacity, "internal": failures, "made_up": 1}}
            }]})
        };
        let mut r = Requests::default();
        r.observe(&[ep(5, 1, 2)]);
        let d = r.observe(&[ep(15, 2, 9)]);
        let c = &d.by_endpoint[&("svc".to_owned(), "allocator-allocate".to_owned())];
        assert_eq!((c.requests, c.failures), (10, 1));
        assert_eq!(c.errors_by_code["no_capacity"], 7);
        assert_eq!(c.errors_by_code["internal"], 1);
        assert!(!c.errors_by_code.contains_key("unknown"), "{c:?}");
    }
}
