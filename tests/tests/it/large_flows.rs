//! Flows larger than one KV entry: their tasks live in pages written with the
//! flow's entry in one atomic batch.

use std::time::Duration;

use async_nats::jetstream;
use common::msg::{FlowSpec, FlowState, TaskState};
use orchestrator::store::PAGE_TASKS;
use testkit::{eventually, Replica, System};

use crate::orchestrator::{random_dag, wait_finished, wait_registered, Runs};

/// Page entries of a flow in the flows bucket.
async fn page_keys(js: &jetstream::Context, flow: &str) -> usize {
    use futures::StreamExt;
    let kv = js.get_key_value(common::nats::KV_FLOWS).await.unwrap();
    kv.keys()
        .await
        .unwrap()
        .filter(|k| {
            let page = k
                .as_ref()
                .is_ok_and(|k| k.starts_with(&format!("{flow}.p")));
            async move { page }
        })
        .count()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_flow_runs_each_task_once_with_two_replicas_and_one_killed() {
    let sys = System::start().await;
    let replica = Replica::start("orchestrator", sys.server.config());
    let runs = Runs::default();
    let agents = runs.agents(&sys.nats, "p", 2, 16.0, Duration::ZERO);
    for i in 0..2 {
        wait_registered(&sys.client, &format!("p{i}")).await;
    }
    let n = PAGE_TASKS + PAGE_TASKS / 2;
    let created = sys.client.create_flow(&random_dag(n, 11)).await.unwrap();
    let flow = created.flow_id.clone();
    let js = jetstream::new(sys.nats.clone());
    assert_eq!(page_keys(&js, flow.as_str()).await, 2, "two pages");
    eventually(Duration::from_secs(60), "work under way", || async {
        let s = sys.client.flow_status(&flow).await.ok()?;
        (s.progress > 0.1).then_some(())
    })
    .await;
    replica.kill();
    let done = wait_finished(&sys.client, &flow, Duration::from_secs(240)).await;
    assert_eq!(done.state, FlowState::Succeeded, "{:?}", done.counts);
    assert_eq!(done.counts.get(&TaskState::Succeeded), Some(&n));
    runs.assert_each_once(n);
    for (stop, handle) in agents {
        let _ = stop.send(());
        handle.await.unwrap().unwrap();
    }
}

/// A 100k-task spec is larger than a NATS message: the client hands it over
/// through the object store, and the flow is stored in pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_task_flow_is_created_over_the_wire_paged_and_cancelled() {
    let sys = System::start().await;
    let n = 100_000;
    // No agent will ever take these tasks: one placement at a time keeps the
    // allocator's refusals from filling the two cores while the test reads.
    let mut spec = FlowSpec::new(
        "wide",
        (0..n)
            .map(|i| crate::orchestrator::cpu_task(&format!("t{i}"), &[]))
            .collect(),
    );
    spec.max_parallelism = Some(1);
    // Every request on a 100,000-task flow is heavy (the first status reads
    // 100 pages; a cancel rewrites every page and sends an event per task):
    // on a loaded machine one may take longer than the client's usual 10 s.
    let patient = sys.client.clone().with_timeout(Duration::from_secs(60));
    let created = patient.create_flow(&spec).await.unwrap();
    let flow = created.flow_id.clone();
    let js = jetstream::new(sys.nats.clone());
    assert_eq!(page_keys(&js, flow.as_str()).await, n / PAGE_TASKS);
    let status = patient.flow_status(&flow).await.unwrap();
    assert_eq!(status.counts.values().sum::<usize>(), n);
    assert_eq!(status.counts.get(&TaskState::Ready), Some(&n));
    assert!(status.tasks.len() < n, "the status lists a bounded sample");
    assert_eq!(status.tasks_omitted, n - status.tasks.len());
    let cancelled = patient.cancel_flow(&flow).await.unwrap();
    assert_eq!(cancelled.state, FlowState::Cancelled);
    let after = patient.flow_status(&flow).await.unwrap();
    assert_eq!(after.counts.get(&TaskState::Cancelled), Some(&n));
}
