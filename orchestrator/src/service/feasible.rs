//! Whether a new flow could run on the registered agents: the allocator's
//! verdicts per requirement, reused for a while as advice (see
//! [`FEASIBLE_FOR_MS`]).

use super::*;

/// Infeasible-requirement warnings listed one by one; more are counted.
pub(super) const MAX_WARNINGS: usize = 100;

/// How long creation waits for the allocator's word on whether a task's
/// requirements could ever fit, when that is only advice (a warning): a
/// slow allocator delays the reply by this much, not a request timeout.
const FEASIBLE_CHECK_WAIT: Duration = Duration::from_secs(1);

impl Orchestrator {
    /// Tasks whose requirements no registered agent could satisfy even when
    /// idle: no agent has the capabilities and labels, or none has the
    /// capacity at all. Each distinct requirement is asked about once.
    ///
    /// As advice (`strict` false) a recent "fits" is taken as it stands,
    /// the allocator is waited for [`FEASIBLE_CHECK_WAIT`] at most, and
    /// without its answer nothing is known: no warning rather than a false
    /// one. For a flow to refuse when infeasible (`strict`) every verdict is
    /// asked afresh, and no answer is an error: it is not known whether the
    /// flow could run.
    pub(super) async fn infeasible(
        &self,
        spec: &FlowSpec,
        strict: bool,
    ) -> Result<Vec<common::msg::ValidationProblem>, Error> {
        let client = if strict {
            self.client.clone()
        } else {
            self.client.clone().with_timeout(FEASIBLE_CHECK_WAIT)
        };
        let mut verdicts: Vec<(&common::msg::Requirements, Option<String>)> = Vec::new();
        let mut out = Vec::new();
        for t in &spec.tasks {
            let known = verdicts
                .iter()
                .find(|(r, _)| *r == &t.requirements)
                .map(|(_, v)| v.clone());
            let verdict = match known {
                Some(v) => v,
                None => {
                    let v = if !strict && self.known_feasible(&t.requirements) {
                        None
                    } else {
                        match self.never_fits(&client, &t.requirements).await {
                            Ok(None) => {
                                self.note_feasible(&t.requirements);
                                None
                            }
                            Ok(why) => why,
                            Err(e) if strict => {
                                return Err(Error::unavailable(
                                    "not known whether registered agents could run every \
                                     task (the flow sets `require_feasible`)",
                                    e,
                                ))
                            }
                            Err(_) => None,
                        }
                    };
                    verdicts.push((&t.requirements, v.clone()));
                    v
                }
            };
            if let Some(why) = verdict {
                out.push(common::msg::ValidationProblem {
                    code: "infeasible_requirements".into(),
                    message: format!("task {}: {why}", t.id),
                    task_id: Some(t.id.clone()),
                    path: Vec::new(),
                });
            }
        }
        // Stored with the flow and sent in every status: a large flow's
        // warnings are summed up past the first few.
        if out.len() > MAX_WARNINGS {
            let more = out.len() - MAX_WARNINGS;
            out.truncate(MAX_WARNINGS);
            out.push(common::msg::ValidationProblem {
                code: "infeasible_requirements".into(),
                message: format!("and {more} more tasks no registered agent could run"),
                task_id: None,
                path: Vec::new(),
            });
        }
        Ok(out)
    }

    fn known_feasible(&self, req: &common::msg::Requirements) -> bool {
        let (Ok(key), Ok(known)) = (serde_json::to_string(req), self.feasible.lock()) else {
            return false;
        };
        known
            .get(&key)
            .is_some_and(|until| *until > common::now_ms())
    }

    fn note_feasible(&self, req: &common::msg::Requirements) {
        let (Ok(key), Ok(mut known)) = (serde_json::to_string(req), self.feasible.lock()) else {
            return;
        };
        if known.len() >= FEASIBLE_KEPT {
            known.clear();
        }
        known.insert(key, common::now_ms() + FEASIBLE_FOR_MS);
    }

    /// An agent left or its capacity changed: "some agent could run it"
    /// must be asked again.
    pub(super) fn forget_feasible(&self) {
        if let Ok(mut known) = self.feasible.lock() {
            known.clear();
        }
    }

    /// Why no registered agent could ever run a task with `req`, if none
    /// could; an error when the allocator did not answer through `client`.
    pub(super) async fn never_fits(
        &self,
        client: &common::Client,
        req: &common::msg::Requirements,
    ) -> Result<Option<String>, Error> {
        let check = CapacityRequest {
            requirements: Some(req.clone()),
            ..Default::default()
        };
        let status = client.capacity(&check).await?;
        if status.fits == Some(true) {
            return Ok(None);
        }
        let Some(best) = status
            .no_fit
            .as_ref()
            .and_then(|n| n.best_candidate.clone())
        else {
            return Ok(Some(match status.no_fit {
                Some(n) => format!(
                    "no registered agent has the capabilities and labels it needs ({})",
                    n.message
                ),
                None => "no registered agent has the capabilities and labels it needs".to_owned(),
            }));
        };
        let Some(totals) = status.agents.get(&best) else {
            return Ok(None);
        };
        let short: Vec<String> = req
            .resources
            .iter()
            .filter(|(r, need)| totals.get(*r).map(|c| c.capacity).unwrap_or(0.0) < **need)
            .map(|(r, need)| format!("{r} {need}"))
            .collect();
        Ok((!short.is_empty()).then(|| {
            format!(
                "needs {} but no suitable agent has that much in all",
                short.join(", ")
            )
        }))
    }
}
