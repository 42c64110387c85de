//! `coord.orchestrator.allocations.held`: the allocator's reconciliation asks
//! which of the allocations it booked for flow tasks those tasks still hold
//! (see the allocator's `reconcile`). Answered from the stored flows, so any
//! replica answers alike; a flow that cannot be read counts as holding
//! everything, so nothing is taken back on doubt.

use std::collections::BTreeMap;

use async_nats::jetstream::kv;
use common::msg::{HeldQuery, HeldReply, HeldRequest, Unheld};
use common::{Error, FlowId};

use crate::store;

/// Most allocations one request may ask about.
pub(crate) const MAX_QUERIES: usize = 10_000;

pub(crate) async fn held(flows: &kv::Store, req: HeldRequest) -> Result<HeldReply, Error> {
    let now = common::now_ms();
    if req.allocations.len() > MAX_QUERIES {
        return Err(Error::bad_request(format!(
            "{} allocations asked about; at most {MAX_QUERIES} per request",
            req.allocations.len()
        )));
    }
    let mut by_flow: BTreeMap<FlowId, Vec<HeldQuery>> = BTreeMap::new();
    for q in req.allocations {
        by_flow.entry(q.task.flow_id.clone()).or_default().push(q);
    }
    let mut reply = HeldReply::default();
    for (flow_id, queries) in by_flow {
        match store::read(flows, &flow_id).await {
            Ok(Some((flow, _, _))) => {
                for q in queries {
                    if let Err(reason) = flow.holds(&q.task.task_id, &q.allocation_id, now) {
                        reply.unheld.push(Unheld {
                            allocation_id: q.allocation_id,
                            reason,
                        });
                    }
                }
            }
            Ok(None) => reply.unheld.extend(queries.into_iter().map(|q| Unheld {
                allocation_id: q.allocation_id,
                reason: format!("flow {flow_id} is gone"),
            })),
            Err(e) => {
                tracing::debug!(flow = %flow_id, error = %e, "flow not read; its allocations count as held");
            }
        }
    }
    Ok(reply)
}
