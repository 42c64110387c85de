//! A typed client for every request/reply API, so callers never touch subjects
//! or JSON and get the server's [`Error`] back as a value they can match on.
//!
//! Registration and state requests go to the named agent's own subject
//! (`coord.agents.{id}.…`): an agent confined by the server's permissions can
//! make them for itself only, and an operator (allowed everything) for anyone.

use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, ErrorBody, ErrorCode};
use crate::msg::*;
use crate::{subject, telemetry};
use tracing::Instrument;

/// Requests to the coordkit services over one NATS connection (cheap to clone).
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    timeout: Duration,
}

impl Client {
    pub fn new(nats: async_nats::Client) -> Self {
        Client {
            nats,
            timeout: Duration::from_secs(5),
        }
    }

    /// Deadline for each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Sends `req` to `subject` and decodes the reply or the error it carries.
    pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: &str,
        req: &Req,
    ) -> Result<Resp, Error> {
        let body = serde_json::to_vec(req)
            .map_err(|e| Error::bad_request(format!("encode request: {e}")))?;
        let span = telemetry::client_span(subject);
        let request = async_nats::client::Request::new()
            .payload(body.into())
            .headers(span.in_scope(telemetry::headers))
            .timeout(Some(self.timeout));
        let reply = self
            .nats
            .send_request(subject.to_owned(), request)
            .instrument(span)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Error::new(
                    ErrorCode::Unavailable,
                    format!("no service answers {subject}"),
                ),
                async_nats::RequestErrorKind::TimedOut => Error::new(
                    ErrorCode::Timeout,
                    format!("{subject}: no reply within {:?}", self.timeout),
                ),
                async_nats::RequestErrorKind::MaxPayloadExceeded => {
                    Error::from_source(ErrorCode::PayloadTooLarge, subject, e)
                }
                _ => Error::unavailable(subject, e),
            })?;
        decode_reply(&reply)
    }

    pub async fn register_agent(&self, req: &RegisterAgent) -> Result<AgentInfo, Error> {
        self.request(&subject::agent_register(&req.agent_id), req)
            .await
    }

    /// Books an allocation. Without a deadline of its own, the request gets
    /// this client's: the moment it stops waiting for the answer.
    pub async fn allocate(&self, req: &AllocateRequest) -> Result<Allocation, Error> {
        if req.deadline_ms.is_some() {
            return self.request(subject::ALLOCATE, req).await;
        }
        let deadline = crate::now_ms().saturating_add(self.timeout.as_millis() as u64);
        let req = AllocateRequest {
            deadline_ms: Some(deadline),
            ..req.clone()
        };
        self.request(subject::ALLOCATE, &req).await
    }

    pub async fn release(&self, req: &ReleaseRequest) -> Result<ReleaseReply, Error> {
        self.request(subject::RELEASE, req).await
    }

    pub async fn renew(&self, req: &RenewRequest) -> Result<Allocation, Error> {
        self.request(subject::RENEW, req).await
    }

    pub async fn allocations_held(&self, req: &HeldRequest) -> Result<HeldReply, Error> {
        self.request(subject::ALLOCATIONS_HELD, req).await
    }

    pub async fn capacity(&self, req: &CapacityRequest) -> Result<CapacityStatus, Error> {
        self.request(subject::CAPACITY_CHECK, req).await
    }

    pub async fn deregister_agent(&self, agent: &crate::AgentId) -> Result<AgentInfo, Error> {
        self.request(
            &subject::agent_deregister(agent),
            &DeregisterAgent {
                agent_id: agent.clone(),
            },
        )
        .await
    }

    /// The agent is done: `left`, whatever it still held handed back.
    pub async fn leave_agent(&self, agent: &crate::AgentId) -> Result<AgentInfo, Error> {
        self.request(
            &subject::agent_leave(agent),
            &crate::msg::LeaveAgent {
                agent_id: agent.clone(),
            },
        )
        .await
    }

    pub async fn allocate_gang(&self, req: &GangRequest) -> Result<GangReply, Error> {
        self.request(subject::ALLOCATE_GANG, req).await
    }

    pub async fn reserve(&self, req: &ReserveRequest) -> Result<Reservation, Error> {
        self.request(subject::CAPACITY_RESERVE, req).await
    }

    pub async fn cancel_reservation(&self, req: &CancelReservation) -> Result<CancelReply, Error> {
        self.request(subject::RESERVATION_CANCEL, req).await
    }

    pub async fn adjust_capacity(&self, req: &AdjustRequest) -> Result<AdjustReply, Error> {
        self.request(subject::CAPACITY_ADJUST, req).await
    }

    pub async fn set_quota(&self, req: &QuotaRequest) -> Result<QuotaReply, Error> {
        self.request(subject::QUOTA_SET, req).await
    }

    pub async fn optimize(&self, req: &OptimizeRequest) -> Result<OptimizePlan, Error> {
        self.request(subject::OPTIMIZE, req).await
    }

    /// Creates a flow. A spec larger than a request may be sends its tasks
    /// ahead through the object store (see [`FlowSpec::tasks_object`]).
    pub async fn create_flow(&self, spec: &FlowSpec) -> Result<FlowStatus, Error> {
        let tasks = serde_json::to_vec(&spec.tasks)
            .map_err(|e| Error::new(ErrorCode::BadRequest, format!("flow spec: {e}")))?;
        if tasks.len() < crate::service::MAX_REQUEST_BYTES / 2 {
            return self.request(subject::FLOW_CREATE, spec).await;
        }
        let js = async_nats::jetstream::new(self.nats.clone());
        let uploads = crate::nats::ensure_uploads(&js).await?;
        let name = uuid::Uuid::now_v7().simple().to_string();
        uploads
            .put(name.as_str(), &mut tasks.as_slice())
            .await
            .map_err(|e| Error::unavailable("upload of the tasks", e))?;
        let head = FlowSpec {
            id: spec.id.clone(),
            name: spec.name.clone(),
            tasks: Vec::new(),
            max_parallelism: spec.max_parallelism,
            failure_mode: spec.failure_mode,
            require_feasible: spec.require_feasible,
            tasks_object: Some(name),
            owner: spec.owner.clone(),
        };
        self.request(subject::FLOW_CREATE, &head).await
    }

    pub async fn flow_status(&self, flow: &crate::FlowId) -> Result<FlowStatus, Error> {
        self.request(
            subject::FLOW_STATUS,
            &FlowRef {
                flow_id: flow.clone(),
            },
        )
        .await
    }

    /// The flow's spec as submitted, with its id.
    pub async fn flow_get(&self, flow: &crate::FlowId) -> Result<FlowSpec, Error> {
        self.request(subject::FLOW_GET, &flow_ref(flow)).await
    }

    /// Stops starting tasks; tasks already running finish.
    pub async fn pause_flow(&self, flow: &crate::FlowId) -> Result<FlowStatus, Error> {
        self.request(subject::FLOW_PAUSE, &flow_ref(flow)).await
    }

    pub async fn resume_flow(&self, flow: &crate::FlowId) -> Result<FlowStatus, Error> {
        self.request(subject::FLOW_RESUME, &flow_ref(flow)).await
    }

    /// Cancels the flow: its agents are told to stop and its allocations released.
    pub async fn cancel_flow(&self, flow: &crate::FlowId) -> Result<FlowStatus, Error> {
        self.request(subject::FLOW_CANCEL, &flow_ref(flow)).await
    }

    pub async fn modify_flow(&self, changes: &FlowChanges) -> Result<FlowStatus, Error> {
        self.request(subject::FLOW_MODIFY, changes).await
    }

    /// Runs a finished task and everything downstream of it again.
    pub async fn rerun_task(&self, req: &RerunRequest) -> Result<FlowStatus, Error> {
        self.request(subject::FLOW_RERUN, req).await
    }

    /// Every reason each unfinished task is where it is.
    pub async fn explain_flow(&self, req: &ExplainRequest) -> Result<Explanation, Error> {
        self.request(subject::FLOW_EXPLAIN, req).await
    }

    pub async fn optimize_flow(&self, req: &FlowOptimizeRequest) -> Result<FlowPlan, Error> {
        self.request(subject::FLOW_OPTIMIZE, req).await
    }

    pub async fn list_flows(&self, req: &FlowListRequest) -> Result<FlowList, Error> {
        self.request(subject::FLOW_LIST, req).await
    }

    /// Registers (or replaces) a trigger; the reply is the trigger as stored.
    pub async fn set_trigger(
        &self,
        trigger: &crate::msg::Trigger,
    ) -> Result<crate::msg::Trigger, Error> {
        self.request(subject::TRIGGER_SET, trigger).await
    }

    pub async fn get_trigger(&self, name: &str) -> Result<crate::msg::Trigger, Error> {
        let r = crate::msg::TriggerRef {
            name: name.to_owned(),
        };
        self.request(subject::TRIGGER_GET, &r).await
    }

    pub async fn list_triggers(&self) -> Result<crate::msg::TriggerList, Error> {
        self.request(subject::TRIGGER_LIST, &crate::msg::TriggerListRequest {})
            .await
    }

    /// Removes a trigger; flows it started run on.
    pub async fn delete_trigger(&self, name: &str) -> Result<crate::msg::TriggerDeleted, Error> {
        let r = crate::msg::TriggerRef {
            name: name.to_owned(),
        };
        self.request(subject::TRIGGER_DELETE, &r).await
    }

    /// The latest document of `agent` in the default scope.
    pub async fn state_get(&self, agent: &crate::AgentId) -> Result<StateDoc, Error> {
        self.state_get_at(&StateGet {
            agent_id: agent.clone(),
            scope: Default::default(),
            revision: None,
        })
        .await
    }

    /// A document in any scope, latest or at a revision.
    pub async fn state_get_at(&self, req: &StateGet) -> Result<StateDoc, Error> {
        self.request(&subject::agent_state_get(&req.agent_id), req)
            .await
    }

    pub async fn state_put(&self, req: &StatePut) -> Result<StateDoc, Error> {
        self.request(&subject::agent_state_put(&req.agent_id), req)
            .await
    }

    pub async fn state_delete(&self, req: &StateDelete) -> Result<StateDeleted, Error> {
        self.request(&subject::agent_state_delete(&req.agent_id), req)
            .await
    }

    pub async fn state_history(&self, req: &StateHistoryRequest) -> Result<StateHistory, Error> {
        self.request(&subject::agent_state_history(&req.agent_id), req)
            .await
    }

    pub async fn scope_set(&self, cfg: &ScopeConfig) -> Result<ScopeConfig, Error> {
        self.request(subject::SCOPE_SET, cfg).await
    }

    pub async fn scope_get(&self, scope: &crate::ScopeId) -> Result<ScopeConfig, Error> {
        self.request(
            subject::SCOPE_GET,
            &ScopeGet {
                scope: scope.clone(),
            },
        )
        .await
    }

    pub async fn validate_states(&self, req: &ValidateRequest) -> Result<ValidationReport, Error> {
        self.request(subject::VALIDATE, req).await
    }

    pub async fn synchronize(&self, req: &SynchronizeRequest) -> Result<SyncReport, Error> {
        self.request(subject::SYNCHRONIZE, req).await
    }

    pub async fn syncpoint_initiate(&self, req: &SyncPointInitiate) -> Result<SyncPoint, Error> {
        self.request(subject::SYNCPOINT_INITIATE, req).await
    }

    pub async fn syncpoint_complete(&self, req: &SyncPointWait) -> Result<SyncPoint, Error> {
        self.request(subject::SYNCPOINT_COMPLETE, req).await
    }

    pub async fn syncpoint_rollback(&self, req: &SyncPointWait) -> Result<RollbackReport, Error> {
        self.request(subject::SYNCPOINT_ROLLBACK, req).await
    }

    pub async fn syncpoint_list(&self, req: &SyncPointListRequest) -> Result<SyncPointList, Error> {
        self.request(subject::SYNCPOINT_LIST, req).await
    }

    pub async fn syncpoint_get(&self, id: &crate::SyncPointId) -> Result<SyncPoint, Error> {
        self.request(
            subject::SYNCPOINT_GET,
            &SyncPointRef {
                sync_point_id: id.clone(),
            },
        )
        .await
    }

    pub async fn syncpoint_diff(&self, id: &crate::SyncPointId) -> Result<SyncPointDiff, Error> {
        self.request(
            subject::SYNCPOINT_DIFF,
            &SyncPointRef {
                sync_point_id: id.clone(),
            },
        )
        .await
    }

    /// Publishes one event of the named agent's and waits for the verdict:
    /// the stored event, or why it was refused.
    pub async fn publish_event(
        &self,
        agent: &crate::AgentId,
        event_type: &str,
        event: &AgentEventPublish,
    ) -> Result<AgentEvent, Error> {
        self.request(&subject::agent_event(agent, event_type)?, event)
            .await
    }

    /// Stored agent events matching `query`, oldest first, one page.
    pub async fn list_events(&self, query: &AgentEventQuery) -> Result<AgentEventList, Error> {
        self.request(subject::AGENT_EVENTS_LIST, query).await
    }

    pub async fn event_schema_set(&self, req: &EventSchemaSet) -> Result<EventSchema, Error> {
        self.request(subject::EVENT_SCHEMA_SET, req).await
    }

    pub async fn event_schema_get(&self, event_type: &str) -> Result<EventSchema, Error> {
        self.request(
            subject::EVENT_SCHEMA_GET,
            &EventSchemaGet {
                event_type: event_type.to_owned(),
            },
        )
        .await
    }

    pub async fn event_schema_list(&self) -> Result<EventSchemaList, Error> {
        self.request(subject::EVENT_SCHEMA_LIST, &EventSchemaListRequest {})
            .await
    }

    pub async fn metrics(&self) -> Result<SystemMetrics, Error> {
        self.request(subject::MONITOR_METRICS, &MetricsRequest {})
            .await
    }

    pub async fn analysis(&self) -> Result<PerformanceAnalysis, Error> {
        self.request(subject::MONITOR_ANALYSIS, &AnalysisRequest {})
            .await
    }

    pub async fn anomalies(&self, req: &AnomaliesRequest) -> Result<AnomalyList, Error> {
        self.request(subject::MONITOR_ANOMALIES, req).await
    }

    pub async fn health(&self) -> Result<HealthStatus, Error> {
        self.request(subject::MONITOR_HEALTH, &HealthRequest {})
            .await
    }

    pub async fn validate_system(&self) -> Result<SystemValidation, Error> {
        self.request(subject::MONITOR_VALIDATE, &SystemValidateRequest {})
            .await
    }

    pub async fn health_report(&self) -> Result<HealthReport, Error> {
        self.request(subject::MONITOR_REPORT, &ReportRequest {})
            .await
    }
}

fn flow_ref(flow: &crate::FlowId) -> FlowRef {
    FlowRef {
        flow_id: flow.clone(),
    }
}

/// A reply is an error when it carries the micro-service error header or an
/// `{"error": …}` body; the body, when readable, gives the precise code.
pub fn decode_reply<Resp: DeserializeOwned>(reply: &async_nats::Message) -> Result<Resp, Error> {
    let header_code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
        .map(|v| v.as_str().to_owned());
    if header_code.is_some() || reply.payload.starts_with(br#"{"error""#) {
        if let Ok(body) = serde_json::from_slice::<ErrorBody>(&reply.payload) {
            return Err(body.error);
        }
        let message = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| "error reply without a body".to_owned());
        let code = match header_code.as_deref() {
            Some("400") => ErrorCode::BadRequest,
            Some("404") => ErrorCode::NotFound,
            Some("409") => ErrorCode::Conflict,
            Some("503") => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        };
        return Err(Error::new(code, message));
    }
    serde_json::from_slice(&reply.payload).map_err(|e| Error::internal_from("unreadable reply", e))
}
