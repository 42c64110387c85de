//! Test-only fail points (cargo feature `failpoints`), for tests that stop a
//! replica at an exact spot and then kill it.

use common::FlowId;

/// Between the write of a flow's step (or its creation) and the publishing of
/// what follows from it (events, the assignment): armed for one flow, the
/// replica's work on that flow stops there for good, as if the process had
/// died at that instant.
pub const AFTER_WRITE: &str = "orchestrator::after-write";

/// Stops every replica in this process after its next writes of `flow`.
pub fn hold_after_write(flow: &FlowId) {
    if let Err(e) = fail::cfg(AFTER_WRITE, &format!("return({flow})")) {
        tracing::error!(error = %e, "fail point not armed");
    }
}

/// Disarms [`hold_after_write`] (work already held stays held).
pub fn release_after_write() {
    fail::remove(AFTER_WRITE);
}

/// Parks the caller for ever when [`AFTER_WRITE`] is armed for `flow`.
pub(crate) async fn after_write(flow: &FlowId) {
    let held = (|| {
        fail::fail_point!(AFTER_WRITE, |arg| arg.as_deref() == Some(flow.as_str()));
        false
    })();
    if held {
        tracing::warn!(%flow, "held at the fail point {AFTER_WRITE}");
        std::future::pending::<()>().await;
    }
}

/// After a stored agent event's triggered flows are created and before the
/// event is acknowledged: armed for one trigger, the replica's trigger
/// consumer stops there for good, as if the process had died at that instant.
pub const BEFORE_TRIGGER_ACK: &str = "orchestrator::before-trigger-ack";

/// Stops every replica in this process before it acknowledges an event that
/// started a flow of `trigger`.
pub fn hold_before_trigger_ack(trigger: &str) {
    if let Err(e) = fail::cfg(BEFORE_TRIGGER_ACK, &format!("return({trigger})")) {
        tracing::error!(error = %e, "fail point not armed");
    }
}

/// Disarms [`hold_before_trigger_ack`] (work already held stays held).
pub fn release_before_trigger_ack() {
    fail::remove(BEFORE_TRIGGER_ACK);
}

/// Parks the caller for ever when [`BEFORE_TRIGGER_ACK`] is armed for one of `started`.
pub(crate) async fn before_trigger_ack(started: &[String]) {
    let held = (|| {
        fail::fail_point!(BEFORE_TRIGGER_ACK, |arg| started
            .iter()
            .any(|t| arg.as_deref() == Some(t.as_str())));
        false
    })();
    if held {
        tracing::warn!(?started, "held at the fail point {BEFORE_TRIGGER_ACK}");
        std::future::pending::<()>().await;
    }
}
