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

/// Before a new flow's first write: armed `hold`, the write waits until the
/// point is disarmed; armed `fail` (once), it is not made, and fails as a
/// server that did not answer would.
pub const CREATE_WRITE: &str = "orchestrator::create-write";

/// Holds every creation's write in this process until
/// [`release_create_writes`].
pub fn hold_create_writes() {
    if let Err(e) = fail::cfg(CREATE_WRITE, "return(hold)") {
        tracing::error!(error = %e, "fail point not armed");
    }
}

/// Fails the next creation's write in this process, without making it.
pub fn fail_next_create_write() {
    if let Err(e) = fail::cfg(CREATE_WRITE, "1*return(fail)") {
        tracing::error!(error = %e, "fail point not armed");
    }
}

/// Disarms [`hold_create_writes`]: held writes go ahead.
pub fn release_create_writes() {
    fail::remove(CREATE_WRITE);
}

/// Waits while [`CREATE_WRITE`] is armed `hold`; whether it is armed `fail`.
pub(crate) async fn create_write(flow: &FlowId) -> bool {
    let mut held = false;
    loop {
        let arg = (|| {
            fail::fail_point!(CREATE_WRITE, |arg| arg);
            None
        })();
        match arg.as_deref() {
            Some("hold") => {
                if !held {
                    tracing::warn!(%flow, "creation held at the fail point {CREATE_WRITE}");
                    held = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Some("fail") => return true,
            _ => return false,
        }
    }
}
