//! The dashboard's actions: pause, resume or cancel a flow, rerun a task,
//! drain an agent — the operator's own requests, made for a browser.
//!
//! Off unless `MONITOR_ACTIONS_TOKEN` is set; then every action carries the
//! token as `Authorization: Bearer …`. A header, not a cookie: a page from
//! another origin cannot send it without a CORS preflight, which the monitor
//! never answers, so no other site can act through a logged-in browser. The
//! monitor acts with its own NATS login (a service's), so the services apply
//! their usual rules; every action is logged with its target and outcome.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::msg::{DeregisterAgent, RerunRequest};
use common::{subject, AgentId, Error, ErrorCode, FlowId, TaskId};
use serde::Serialize;
use subtle::ConstantTimeEq;

use super::http::error;
use super::Shared;

/// Shortest token accepted: a guessable one would be worse than none.
const MIN_TOKEN: usize = 16;

/// The configured token, checked at start-up: `None` turns actions off.
pub(super) fn token(configured: Option<&str>) -> Result<Option<String>, Error> {
    match configured.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) if t.len() < MIN_TOKEN => Err(Error::new(
            ErrorCode::BadRequest,
            format!("MONITOR_ACTIONS_TOKEN is {} characters; at least {MIN_TOKEN} are needed (e.g. `openssl rand -hex 24`)", t.len()),
        )),
        Some(t) => Ok(Some(t.to_owned())),
    }
}

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/actions", get(settings))
        .route("/api/flows/{id}/{action}", post(flow_action))
        .route("/api/flows/{id}/tasks/{task}/rerun", post(rerun))
        .route("/api/agents/{id}/drain", post(drain))
}

/// Whether the dashboard should offer actions (it asks for the token then).
async fn settings(State(s): State<Arc<Shared>>) -> Response {
    Json(serde_json::json!({ "enabled": s.actions_token.is_some() })).into_response()
}

/// The refusal of a request without the configured token; `None` lets it
/// through.
fn refused(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &s.actions_token else {
        return Some(error(Error::new(
            ErrorCode::Forbidden,
            "dashboard actions are off: set MONITOR_ACTIONS_TOKEN on the monitor to turn them on",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return None;
    }
    let body = Error::new(
        ErrorCode::Forbidden,
        "this action needs the monitor's action token (Authorization: Bearer …)",
    )
    .to_body();
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, "Bearer"),
                (header::CONTENT_TYPE, "application/json"),
            ],
            body,
        )
            .into_response(),
    )
}

/// The service's answer, logged with what was asked.
fn done<T: Serialize>(action: &str, target: &str, result: Result<T, Error>) -> Response {
    match result {
        Ok(v) => {
            tracing::info!(action, target, "dashboard action done");
            Json(v).into_response()
        }
        Err(e) => {
            tracing::info!(action, target, code = e.code.as_str(), error = %e.message, "dashboard action refused");
            error(e)
        }
    }
}

async fn flow_action(
    State(s): State<Arc<Shared>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refused(&s, &headers) {
        return r;
    }
    let flow = match FlowId::new(&id) {
        Ok(f) => f,
        Err(e) => return error(e.into()),
    };
    let result = match action.as_str() {
        "pause" => s.client.pause_flow(&flow).await,
        "resume" => s.client.resume_flow(&flow).await,
        "cancel" => s.client.cancel_flow(&flow).await,
        other => Err(Error::not_found(format!(
            "no flow action {other:?}: pause, resume or cancel"
        ))),
    };
    done(&action, &id, result)
}

async fn rerun(
    State(s): State<Arc<Shared>>,
    Path((flow, task)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refused(&s, &headers) {
        return r;
    }
    let req = match (FlowId::new(&flow), TaskId::new(&task)) {
        (Ok(flow_id), Ok(task_id)) => RerunRequest { flow_id, task_id },
        (Err(e), _) | (_, Err(e)) => return error(e.into()),
    };
    done(
        "rerun",
        &format!("{flow}/{task}"),
        s.client.rerun_task(&req).await,
    )
}

/// Drain: no new work for the agent; what it runs finishes. Sent on the
/// operators' subject, which a service's login may use under isolation
/// (the agent's own `coord.agents.{id}.deregister` is the agent's alone).
async fn drain(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refused(&s, &headers) {
        return r;
    }
    let agent_id = match AgentId::new(&id) {
        Ok(a) => a,
        Err(e) => return error(e.into()),
    };
    let result: Result<common::msg::AgentInfo, Error> = s
        .client
        .request(subject::AGENT_DEREGISTER, &DeregisterAgent { agent_id })
        .await;
    done("drain", &id, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_token_is_off_and_a_short_one_is_refused() {
        assert_eq!(token(None).unwrap(), None);
        assert_eq!(token(Some("  ")).unwrap(), None);
        let e = token(Some("secret")).unwrap_err();
        assert!(e.message.contains("at least 16"), "{}", e.message);
        let t = "0123456789abcdef";
        assert_eq!(token(Some(t)).unwrap().as_deref(), Some(t));
    }
}
