//! The rules on what an agent asks of the services for itself: a state write
//! from the revision it read, an event of its own, a sync notice answered.

use super::*;

impl Kit {
    pub(super) async fn state_cas(&self) -> RuleOutcome {
        // The kit writes first, so an agent must read the revision to write.
        let current = match self.client.state_get(&self.agent).await {
            Ok(d) => d.revision,
            Err(e) if e.code == ErrorCode::NotFound => 0,
            Err(e) => return Err(format!("state not read: {e}")),
        };
        let written = self
            .client
            .state_put(&StatePut {
                agent_id: self.agent.clone(),
                expected_revision: current,
                doc: json!({ "written_by": "coordctl conformance" }),
                scope: Default::default(),
                clock: None,
            })
            .await
            .map_err(because("the kit's own state not written"))?;
        let state = json!({
            "conformance": "state_cas",
            "nonce": uuid::Uuid::now_v7().simple().to_string(),
        });
        let flow = self
            .submit(
                Rule::StateCas,
                json!({ "sleep_ms": 0, "state": state }),
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            self.succeeded(&flow).await?;
            // The agent puts before its final report, so the document is there now.
            let doc = self
                .client
                .state_get(&self.agent)
                .await
                .map_err(because("state not read"))?;
            if doc.doc != state {
                return Err(format!(
                    "the document is {} (revision {}), not the task's state: the put must name the revision read (the kit wrote revision {})",
                    doc.doc, doc.revision, written.revision
                ));
            }
            Ok(Outcome::Pass(format!(
                "revision {} over the kit's {}",
                doc.revision, written.revision
            )))
        })
        .await
    }

    pub(super) async fn agent_event(&self) -> RuleOutcome {
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        let event_id = format!("conformance-{nonce}");
        let data = json!({ "conformance": "agent_event", "nonce": nonce });
        let flow = self
            .submit(
                Rule::AgentEvent,
                json!({ "sleep_ms": 0, "event": {
                    "type": "conformance", "data": data, "event_id": event_id
                } }),
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            self.succeeded(&flow).await?;
            // The agent publishes before its final report, so the event is stored now.
            let listed = self
                .client
                .list_events(&common::msg::AgentEventQuery {
                    event_type: Some("conformance".into()),
                    agent_id: Some(self.agent.clone()),
                    field: Some(common::msg::FieldMatch {
                        path: "/nonce".into(),
                        equals: json!(nonce),
                    }),
                    ..Default::default()
                })
                .await
                .map_err(because("events not listed"))?;
            match listed.events.as_slice() {
                [one] if one.event.event_id == event_id && one.event.data == data => Ok(
                    Outcome::Pass(format!("event {event_id} stored (seq {})", one.seq)),
                ),
                [] => Err(format!(
                    "no conformance event of {} with the task's nonce is stored",
                    self.agent
                )),
                other => Err(format!(
                    "expected one event {event_id} with the task's data, found {other:?}"
                )),
            }
        })
        .await
    }

    pub(super) async fn sync_notice(&self) -> RuleOutcome {
        // A sync point needs a document to cut.
        match self.client.state_get(&self.agent).await {
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::NotFound => {
                self.client
                    .state_put(&StatePut {
                        agent_id: self.agent.clone(),
                        expected_revision: 0,
                        doc: json!({ "written_by": "coordctl conformance" }),
                        scope: Default::default(),
                        clock: None,
                    })
                    .await
                    .map_err(because("state not written"))?;
            }
            Err(e) => return Err(format!("state not read: {e}")),
        }
        let point = self
            .client
            .syncpoint_initiate(&SyncPointInitiate {
                scope: Default::default(),
                agents: vec![self.agent.clone()],
                label: "conformance".into(),
            })
            .await
            .map_err(because("sync point not initiated"))?;
        // An agent acknowledges at once; a few seconds are plenty.
        let timeout_ms = self.budget.as_millis().min(5_000) as u64;
        let done = self
            .client
            .clone()
            .with_timeout(Duration::from_millis(timeout_ms + 5_000))
            .syncpoint_complete(&SyncPointWait {
                sync_point_id: point.id.clone(),
                timeout_ms,
            })
            .await
            .map_err(because("sync point not completed"))?;
        if done.state != SyncPointState::Completed {
            return Err(format!(
                "sync point {} {} after {timeout_ms} ms: no acknowledgement on {}",
                point.id,
                crate::cli::wire_name(&done.state),
                subject::sync_ack(&self.agent)
            ));
        }
        Ok(Outcome::Pass(format!(
            "sync point {} acknowledged",
            point.id
        )))
    }
}
