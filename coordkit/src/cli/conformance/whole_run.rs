//! The rules the kit checks from the services' side and over the whole run:
//! refused reports, stale attempts, progress bounds, heartbeats, a clean
//! leave.

use super::*;

impl Kit {
    /// The kit itself reports, as the operator, on a live attempt of the
    /// agent's: a malformed report and a progress of 7.5. Each must be refused
    /// with a typed verdict on the agent's `rejected` subject.
    pub(super) async fn probes(&self) -> (RuleOutcome, RuleOutcome) {
        let flow = self
            .submit(
                Rule::MalformedReport,
                json!({ "sleep_ms": 2500 }),
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        let flow = match flow {
            Ok(f) => f,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let deadline = self.deadline();
        let outcomes = match self.started(&flow, 1, deadline).await {
            Err(e) => (Err(e.clone()), Err(e)),
            Ok(_) => self.probe_both(&flow, deadline).await,
        };
        let _ = self.finished(&flow, deadline).await;
        self.tidy(&flow).await;
        outcomes
    }

    pub(super) async fn probe_both(
        &self,
        flow: &FlowId,
        deadline: Instant,
    ) -> (RuleOutcome, RuleOutcome) {
        {
            {
                let malformed = self
                    .probe(
                        b"{\"flow_id\": \"not a report".to_vec(),
                        ErrorCode::BadRequest,
                        RejectReason::Malformed,
                        deadline,
                    )
                    .await;
                let task = match TaskId::new(TASK) {
                    Ok(t) => t,
                    Err(e) => return (malformed, Err(e.to_string())),
                };
                let out_of_range = AgentReport {
                    flow_id: flow.clone(),
                    task_id: task,
                    attempt: 1,
                    agent_id: self.agent.clone(),
                    kind: ReportKind::Progress {
                        progress: Some(7.5),
                        message: Some("out of range on purpose".into()),
                    },
                    at_ms: common::now_ms(),
                };
                let bounds = match serde_json::to_vec(&out_of_range) {
                    Ok(body) => {
                        self.probe(
                            body,
                            ErrorCode::BadRequest,
                            RejectReason::ProgressOutOfRange,
                            deadline,
                        )
                        .await
                    }
                    Err(e) => Err(e.to_string()),
                };
                // The refused progress changed nothing.
                let bounds = match (bounds, self.client.flow_status(flow).await) {
                    (Ok(o), Ok(s)) => match task_of(&s).and_then(|t| t.progress) {
                        Some(p) if p > 1.0 => {
                            Err(format!("refused, yet the task shows progress {p}"))
                        }
                        _ => Ok(o),
                    },
                    (other, _) => other,
                };
                (malformed, bounds)
            }
        }
    }

    /// Publishes `body` on the agent's report subject and waits for its verdict.
    pub(super) async fn probe(
        &self,
        body: Vec<u8>,
        code: ErrorCode,
        reason: RejectReason,
        deadline: Instant,
    ) -> RuleOutcome {
        let msg_id = format!("{KIT_MSG_ID}.{}", uuid::Uuid::now_v7().simple());
        let to = subject::report(&self.agent);
        let ack = self
            .js
            .publish_with_headers(
                to.clone(),
                common::nats::dedupe_headers(&to, &msg_id),
                body.into(),
            )
            .await
            .map_err(because("report not published"))?;
        ack.await.map_err(because("report not stored"))?;
        let verdict = self
            .wait_log(
                &format!("verdict on {}", subject::rejected(&self.agent)),
                deadline,
                |log| {
                    log.verdicts
                        .iter()
                        .find(|(_, v)| v.msg_id.as_deref() == Some(msg_id.as_str()))
                        .map(|(_, v)| v.clone())
                },
            )
            .await?;
        if verdict.code != code || verdict.reason != reason {
            return Err(format!(
                "verdict {}/{}, not {}/{}",
                super::super::wire_name(&verdict.code),
                super::super::wire_name(&verdict.reason),
                super::super::wire_name(&code),
                super::super::wire_name(&reason)
            ));
        }
        Ok(Outcome::Pass(format!(
            "verdict {}/{}: {}",
            super::super::wire_name(&code),
            super::super::wire_name(&reason),
            verdict.message
        )))
    }

    pub(super) fn stale_attempt(&self) -> RuleOutcome {
        let log = self.log();
        let fenced: Vec<String> = log
            .verdicts
            .iter()
            .filter(|(_, v)| v.code == ErrorCode::Fenced)
            .filter(|(_, v)| {
                !v.msg_id
                    .as_deref()
                    .is_some_and(|m| m.starts_with(KIT_MSG_ID))
            })
            .map(|(_, v)| {
                format!(
                    "{} on {}/{} attempt {} refused: {}",
                    v.report_type.as_deref().unwrap_or("report"),
                    v.flow_id.as_deref().unwrap_or("?"),
                    v.task_id.as_deref().unwrap_or("?"),
                    v.attempt.map_or("?".into(), |a| a.to_string()),
                    super::super::wire_name(&v.reason)
                )
            })
            .collect();
        if !fenced.is_empty() {
            return Err(format!(
                "{} report(s) fenced: {}",
                fenced.len(),
                fenced.join("; ")
            ));
        }
        let sent = log.reports.iter().filter(|r| !r.by_kit()).count();
        Ok(Outcome::Pass(format!("{sent} reports, none fenced")))
    }

    pub(super) fn progress_valid(&self) -> RuleOutcome {
        let log = self.log();
        let mut sent = 0;
        for r in log.reports.iter().filter(|r| !r.by_kit()) {
            if let Ok(AgentReport {
                kind: ReportKind::Progress { progress, message },
                ..
            }) = &r.body
            {
                sent += 1;
                if let Some(p) = progress {
                    if !p.is_finite() || !(0.0..=1.0).contains(p) {
                        return Err(format!("a progress report said {p}, outside 0..=1"));
                    }
                }
                if message.as_ref().is_some_and(|m| m.len() > 1024) {
                    return Err("a progress message is over 1,024 bytes".into());
                }
            }
        }
        if sent == 0 {
            return Ok(Outcome::Skip("the agent sent no progress report".into()));
        }
        Ok(Outcome::Pass(format!("{sent} progress reports in 0..=1")))
    }

    pub(super) async fn heartbeats(&self) -> RuleOutcome {
        let interval = Duration::from_millis(self.heartbeat_ms.max(1));
        let slack = (interval / 2).max(Duration::from_millis(500));
        // Enough beats to judge: three intervals' worth.
        let watched = self.began + interval * 3 + slack;
        if watched > Instant::now() + self.budget {
            return Ok(Outcome::Skip(format!(
                "the interval ({} ms) is too long to judge within --timeout-s",
                interval.as_millis()
            )));
        }
        tokio::time::sleep_until(watched).await;
        let now = Instant::now();
        let log = self.log();
        if !log.lost.is_empty() {
            return Err(format!(
                "{} was declared lost (missed heartbeats)",
                self.agent
            ));
        }
        let mut times = vec![self.began];
        for (at, beat) in &log.heartbeats {
            match beat {
                Ok(b) if b.agent_id == self.agent => times.push(*at),
                Ok(b) => return Err(format!("a heartbeat names agent {}", b.agent_id)),
                Err(e) => return Err(format!("a heartbeat is not valid: {e}")),
            }
        }
        times.push(now);
        let longest = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        if longest > interval + slack {
            return Err(format!(
                "{} ms without a heartbeat; registered interval {} ms",
                longest.as_millis(),
                interval.as_millis()
            ));
        }
        let beats = log.heartbeats.len();
        let most = (now - self.began).as_millis() / interval.as_millis() * 2 + 2;
        if beats as u128 > most {
            return Err(format!(
                "{beats} heartbeats in {} ms, far more than one per {} ms",
                (now - self.began).as_millis(),
                interval.as_millis()
            ));
        }
        Ok(Outcome::Pass(format!(
            "{beats} heartbeats, at most {} ms apart (interval {} ms)",
            longest.as_millis(),
            interval.as_millis()
        )))
    }

    pub(super) async fn clean_leave(&self, stop_cmd: Option<&str>) -> RuleOutcome {
        let Some(cmd) = stop_cmd else {
            return Ok(Outcome::Skip("no --stop-cmd given".into()));
        };
        let since = Instant::now();
        let window = since + Duration::from_secs(5);
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(because("the stop command did not start"))?;
        let left = loop {
            let cap = self
                .client
                .capacity(&CapacityRequest::default())
                .await
                .map_err(because("agent status"))?;
            let status = cap.agent_status.get(&self.agent).copied();
            if status == Some(AgentStatus::Left) {
                break Ok(());
            }
            if Instant::now() >= window {
                break Err(format!(
                    "{} is {} 5 s after the stop command, not left",
                    self.agent,
                    status.map_or("unlisted".into(), |s| super::super::wire_name(&s))
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let exit = tokio::time::timeout_at(window.max(Instant::now()), child.wait()).await;
        left?;
        if let Ok(Ok(status)) = exit {
            if !status.success() {
                return Err(format!("the stop command failed: {status}"));
            }
        }
        let lost = self.log().lost.iter().filter(|at| **at >= since).count();
        if lost > 0 {
            return Err(format!("{} was declared lost while leaving", self.agent));
        }
        Ok(Outcome::Pass(format!(
            "left within {} ms, never lost",
            since.elapsed().as_millis()
        )))
    }
}
