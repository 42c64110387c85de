//! HTTP: Prometheus `/metrics`, `/healthz`, `/report`, the dashboard's API
//! (`/api/flows` with `state`, `q`, `offset`, `limit`; `/api/flows/{id}`;
//! `/api/agents/{id}`; `/api/history`, the charts' points; the actions,
//! `super::actions`) and the dashboard at `/` (one static page, embedded, no
//! build step).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::msg::Verdict;
use common::Error;

use super::views::FlowQuery;
use super::Shared;
use crate::machine::prom;

const DASHBOARD: &str = include_str!("dashboard.html");

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/report", get(report))
        .route("/api/flows", get(flows))
        .route("/api/flows/{id}", get(flow))
        .route("/api/agents/{id}", get(agent))
        .route("/api/history", get(history))
        .merge(super::actions::routes())
        .with_state(shared)
}

pub(super) fn error(e: Error) -> Response {
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        e.to_body(),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let (verdict, replicas) = s.last_verdict.lock().map(|v| v.clone()).unwrap_or_default();
    let status = prom::Status {
        verdict,
        replicas,
        nats_connected: s.nats.connection_state() == async_nats::connection::State::Connected,
        version: common::service::VERSION.to_owned(),
    };
    let text = s.with(|m| m.exposition(common::now_ms())).and_then(|e| {
        prom::render(e, status).map_err(|_| Error::internal("metrics encoding failed"))
    });
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, prom::CONTENT_TYPE)], text).into_response(),
        Err(e) => error(e),
    }
}

/// 200 unless the verdict is `unhealthy` (503), so a load balancer or
/// orchestrator probe can use it as is; the body says why.
async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    match s.health().await {
        Ok(h) => {
            let status = if h.verdict == Verdict::Unhealthy {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            (status, Json(h)).into_response()
        }
        Err(e) => error(e),
    }
}

async fn report(State(s): State<Arc<Shared>>) -> Response {
    match s.report().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(e),
    }
}

async fn flows(State(s): State<Arc<Shared>>, Query(q): Query<FlowQuery>) -> Response {
    match s.flows_view(&q).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

async fn flow(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.flow_view(&id).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

/// The charts' points over the last hour, oldest first.
async fn history(State(s): State<Arc<Shared>>) -> Response {
    match s.with(|m| m.history()) {
        Ok(points) => Json(serde_json::json!({
            "step_ms": s.history_step_ms,
            "points": points,
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

async fn agent(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.agent_view(&id).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}
