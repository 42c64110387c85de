//! The rules on a task's life on the agent: success, failures, progress
//! keeping the lease, a heartbeat timeout, a cancel, a repeated assignment
//! and a preemption.

use super::*;

impl Kit {
    pub(super) async fn success(&self) -> RuleOutcome {
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        let output = json!({ "conformance": "success", "nonce": nonce });
        let window = Instant::now();
        let conf = json!({ "sleep_ms": 200, "output": output });
        let flow = self
            .submit(
                Rule::Success,
                conf,
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let t = self.succeeded(&flow).await?;
            if t.output != output {
                return Err(format!(
                    "output {} is not the one asked for, {output}",
                    t.output
                ));
            }
            let log = self.log();
            let unreadable: Vec<&String> = log
                .reports
                .iter()
                .filter(|r| !r.by_kit() && r.at >= window)
                .filter_map(|r| r.body.as_ref().err())
                .collect();
            if let Some(e) = unreadable.first() {
                return Err(format!("a report is not valid: {e}"));
            }
            let mine: Vec<&SeenReport> = log
                .reports
                .iter()
                .filter(|r| !r.by_kit() && r.body.as_ref().is_ok_and(|b| b.flow_id == flow))
                .collect();
            let kinds: Vec<&str> = mine
                .iter()
                .filter_map(|r| r.body.as_ref().ok().map(|b| b.kind.type_name()))
                .collect();
            // A task done at once may report only its end.
            if kinds.first() != Some(&"started") && kinds != ["completed"] {
                return Err(format!(
                    "the first report was not `started` (nor the only one `completed`): {}",
                    kinds.join(", ")
                ));
            }
            for r in &mine {
                let Ok(b) = &r.body else { continue };
                if b.agent_id != self.agent {
                    return Err(format!("a report names agent {}", b.agent_id));
                }
                if b.attempt != 1 {
                    return Err(format!("a report names attempt {}, not 1", b.attempt));
                }
                msg_id_ok(r, b)?;
            }
            Ok(Outcome::Pass(format!("reports {}", kinds.join(", "))))
        })
        .await
    }

    pub(super) async fn retryable_failure(&self) -> RuleOutcome {
        self.failure(
            Rule::RetryableFailure,
            "retryable",
            2,
            &[(1, true), (2, true)],
            "attempt 1 failed retryable, attempt 2 ran",
        )
        .await
    }

    pub(super) async fn fatal_failure(&self) -> RuleOutcome {
        self.failure(
            Rule::FatalFailure,
            "fatal",
            3,
            &[(1, false)],
            "one attempt, failed for good",
        )
        .await
    }

    /// A task told to fail (`fail`) under `max_attempts`: it must end failed
    /// after as many attempts as `want` lists, each reported (attempt, retryable).
    pub(super) async fn failure(
        &self,
        rule: Rule,
        fail: &str,
        max_attempts: u32,
        want: &[(u32, bool)],
        pass: &str,
    ) -> RuleOutcome {
        let retry = RetryPolicy {
            max_attempts,
            backoff_base_ms: 100,
            ..Default::default()
        };
        let flow = self
            .submit(
                rule,
                json!({ "sleep_ms": 100, "fail": fail }),
                retry,
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let status = self.finished(&flow, self.deadline()).await?;
            let t = task_of(&status).ok_or("the flow has no task")?;
            self.on_agent(t)?;
            let attempts = want.len() as u32;
            if t.state != TaskState::Failed || t.attempt != attempts {
                return Err(format!(
                    "the task ended {} after {} attempt(s), not failed after {attempts} ({})",
                    super::super::wire_name(&t.state),
                    t.attempt,
                    t.error.as_deref().unwrap_or("no error")
                ));
            }
            let failed = self.failed_reports(&flow);
            if failed != want {
                return Err(format!(
                    "failed reports (attempt, retryable) were {failed:?}, not {want:?}"
                ));
            }
            Ok(Outcome::Pass(pass.to_owned()))
        })
        .await
    }

    /// `(attempt, retryable)` of each `failed` report on the flow.
    pub(super) fn failed_reports(&self, flow: &FlowId) -> Vec<(u32, bool)> {
        self.log()
            .reports
            .iter()
            .filter(|r| !r.by_kit())
            .filter_map(|r| match &r.body {
                Ok(AgentReport {
                    flow_id,
                    attempt,
                    kind: ReportKind::Failed { retryable, .. },
                    ..
                }) if flow_id == flow => Some((*attempt, *retryable)),
                _ => None,
            })
            .collect()
    }

    pub(super) async fn progress_keeps_lease(&self) -> RuleOutcome {
        let timeouts = Timeouts {
            heartbeat_ms: Some(1000),
            ..Default::default()
        };
        let flow = self
            .submit(
                Rule::ProgressKeepsLease,
                json!({ "sleep_ms": 3000, "progress_every_ms": 300 }),
                RetryPolicy::default(),
                timeouts,
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let mut shown = None;
            let status = self
                .wait_flow(&flow, "end of the flow", self.deadline(), |s| {
                    if let Some(p) = task_of(s).and_then(|t| t.progress) {
                        shown = Some(p);
                    }
                    s.state.is_terminal().then(|| s.clone())
                })
                .await?;
            let t = task_of(&status).ok_or("the flow has no task")?;
            self.on_agent(t)?;
            if status.state != FlowState::Succeeded {
                return Err(format!(
                    "the task ended {} ({}): progress reports must renew the lease",
                    super::super::wire_name(&t.state),
                    t.error.as_deref().unwrap_or("no error")
                ));
            }
            let sent = self
                .log()
                .reports
                .iter()
                .filter(|r| !r.by_kit() && r.is(&flow, 1))
                .filter(|r| {
                    matches!(
                        r.body,
                        Ok(AgentReport {
                            kind: ReportKind::Progress { .. },
                            ..
                        })
                    )
                })
                .count();
            let Some(shown) = shown.or(t.progress) else {
                return Err(format!(
                    "{sent} progress report(s) sent, none shown in the flow status"
                ));
            };
            Ok(Outcome::Pass(format!(
                "{sent} progress reports over 3 s under a 1 s lease; status showed {shown:.2}"
            )))
        })
        .await
    }

    pub(super) async fn heartbeat_timeout(&self) -> RuleOutcome {
        let timeouts = Timeouts {
            heartbeat_ms: Some(1000),
            ..Default::default()
        };
        let flow = self
            .submit(
                Rule::HeartbeatTimeout,
                json!({ "sleep_ms": 5000 }),
                RetryPolicy::default(),
                timeouts,
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let deadline = self.deadline();
            let started = self.started(&flow, 1, deadline).await?;
            let (at, notice) = self.cancel_notice(&flow, 1, deadline).await?;
            if notice.code != CancelCode::TimedOut {
                return Err(format!(
                    "cancel notice code {}, not timed_out",
                    super::super::wire_name(&notice.code)
                ));
            }
            let status = self.finished(&flow, deadline).await?;
            let t = task_of(&status).ok_or("the flow has no task")?;
            if t.state != TaskState::TimedOut {
                return Err(format!(
                    "the task ended {}, not timed_out",
                    super::super::wire_name(&t.state)
                ));
            }
            self.honours_cancel(&flow, 1, at, started + Duration::from_millis(5000))
                .await?;
            Ok(Outcome::Pass(format!(
                "timed out (\"{}\"), silent after the notice, assignment acked",
                notice.reason
            )))
        })
        .await
    }

    pub(super) async fn cancel(&self) -> RuleOutcome {
        let flow = self
            .submit(
                Rule::Cancel,
                json!({ "sleep_ms": 3000 }),
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let deadline = self.deadline();
            let started = self.started(&flow, 1, deadline).await?;
            tokio::time::sleep_until(started + MID_TASK).await;
            self.client
                .cancel_flow(&flow)
                .await
                .map_err(because("flow not cancelled"))?;
            let (at, notice) = self.cancel_notice(&flow, 1, deadline).await?;
            if notice.code != CancelCode::FlowCancelled {
                return Err(format!(
                    "cancel notice code {}, not flow_cancelled",
                    super::super::wire_name(&notice.code)
                ));
            }
            self.honours_cancel(&flow, 1, at, started + Duration::from_millis(3000))
                .await?;
            Ok(Outcome::Pass(
                "notice flow_cancelled, silent after it, assignment acked".into(),
            ))
        })
        .await
    }

    pub(super) async fn preemption(&self) -> RuleOutcome {
        let Some((resource, capacity)) = self.resource.clone() else {
            return Ok(Outcome::Skip(format!(
                "{} has no capacity the kit's tasks hold, so none can be taken away",
                self.agent
            )));
        };
        let retry = RetryPolicy {
            max_attempts: 2,
            backoff_base_ms: 100,
            ..Default::default()
        };
        let flow = self
            .submit(
                Rule::Preemption,
                json!({ "sleep_ms": 1500 }),
                retry,
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let deadline = self.deadline();
            let started = self.started(&flow, 1, deadline).await?;
            tokio::time::sleep_until(started + MID_TASK).await;
            let adjust = |amount: f64, preempt: bool| AdjustRequest {
                agent_id: self.agent.clone(),
                capacity: [(resource.clone(), amount)].into(),
                preempt,
            };
            let taken = self.client.adjust_capacity(&adjust(0.0, true)).await;
            // Whatever happened, the agent gets its capacity back.
            let notice = match taken {
                Ok(_) => self.cancel_notice(&flow, 1, deadline).await,
                Err(e) => Err(format!("capacity not adjusted: {e}")),
            };
            let restored = self.client.adjust_capacity(&adjust(capacity, false)).await;
            let (at, notice) = notice?;
            restored.map_err(because("capacity not restored"))?;
            if notice.code != CancelCode::Preempted {
                return Err(format!(
                    "cancel notice code {}, not preempted",
                    super::super::wire_name(&notice.code)
                ));
            }
            let status = self.finished(&flow, deadline).await?;
            let t = task_of(&status).ok_or("the flow has no task")?;
            self.on_agent(t)?;
            if status.state != FlowState::Succeeded || t.attempt != 2 {
                return Err(format!(
                    "the task ended {} after {} attempt(s), not succeeded on attempt 2 ({})",
                    super::super::wire_name(&t.state),
                    t.attempt,
                    t.error.as_deref().unwrap_or("no error")
                ));
            }
            self.honours_cancel(&flow, 1, at, started + Duration::from_millis(1500))
                .await?;
            Ok(Outcome::Pass(
                "notice preempted, attempt 1 silent after it, attempt 2 succeeded".into(),
            ))
        })
        .await
    }

    /// The attempt's assignment, as the orchestrator sent it, is sent twice
    /// more while it runs, with an empty probe message between: the agent
    /// runs it once (one `started`, one `completed`).
    pub(super) async fn repeat_ignored(&self) -> RuleOutcome {
        let nats = self.client.nats();
        let mut sent = match nats.subscribe(subject::assign(&self.agent)).await {
            Ok(s) => s,
            Err(e) => return Err(format!("assignments not watched: {e}")),
        };
        let flow = self
            .submit(
                Rule::RepeatIgnored,
                json!({ "sleep_ms": 1500 }),
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let deadline = self.deadline();
            let assignment = loop {
                let next = tokio::time::timeout_at(deadline, sent.next()).await;
                let Ok(Some(msg)) = next else {
                    return Err("the assignment was not seen".into());
                };
                let ours = serde_json::from_slice::<common::msg::Assignment>(&msg.payload)
                    .is_ok_and(|a| a.flow_id == flow && a.attempt == 1);
                if ours {
                    break msg;
                }
            };
            self.started(&flow, 1, deadline).await?;
            let again = |headers: async_nats::HeaderMap, body: bytes::Bytes| {
                nats.publish_with_headers(assignment.subject.clone(), headers, body)
            };
            let mut probe = async_nats::HeaderMap::new();
            probe.insert(subject::PROBE_HEADER, "1");
            let headers = assignment.headers.clone().unwrap_or_default();
            let repeats = [
                (headers.clone(), assignment.payload.clone()),
                (probe, bytes::Bytes::new()),
                (headers, assignment.payload.clone()),
            ];
            for (headers, body) in repeats {
                again(headers, body)
                    .await
                    .map_err(because("assignment not sent again"))?;
            }
            let t = self.succeeded(&flow).await?;
            if t.attempt != 1 {
                return Err(format!("the task ran {} attempts", t.attempt));
            }
            // A second run would report after the first run's end.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let kinds = self.reports_since(&flow, 1, self.began);
            let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
            if count("started") > 1 || count("completed") != 1 {
                return Err(format!("run more than once: reported {}", kinds.join(", ")));
            }
            Ok(Outcome::Pass(format!(
                "two repeats and a probe ignored; reported {}",
                kinds.join(", ")
            )))
        })
        .await
    }
}

/// The report's `Nats-Msg-Id` is `{flow}.{task}.{attempt}.{type}`, with a
/// suffix for progress (each progress report is new); an array of reports
/// has an id of its own.
fn msg_id_ok(seen: &SeenReport, r: &AgentReport) -> Result<(), String> {
    let msg_id = seen.msg_id.as_deref();
    let kind = r.kind.type_name();
    if kind == "unknown" {
        return Err("a report has an unknown type".into());
    }
    if seen.in_array {
        return match msg_id {
            Some(id) if !id.is_empty() => Ok(()),
            _ => Err("an array of reports has no Nats-Msg-Id".into()),
        };
    }
    let want = format!("{}.{}.{}.{kind}", r.flow_id, r.task_id, r.attempt);
    match msg_id {
        Some(id) if id == want => Ok(()),
        Some(id) if kind == "progress" && id.starts_with(&format!("{want}.")) => Ok(()),
        Some(id) => Err(format!("Nats-Msg-Id `{id}`, not `{want}`")),
        None => Err(format!(
            "a {kind} report has no Nats-Msg-Id (want `{want}`)"
        )),
    }
}
