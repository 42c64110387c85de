//! Owner quotas over the wire against a real nats-server: a quota caps an
//! owner and the owners below it across agents with a typed error and nothing
//! booked, gangs count every member, releasing frees quota, lowering a quota
//! reports then preempts the lowest priority first with events, a crash
//! between writes cannot leak quota, bad input changes nothing, and — with
//! two replicas and many concurrent requests — the owner never holds more
//! than its quota at any revision in KV history.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    AllocateRequest, Allocation, CapacityRequest, Event, EventKind, GangRequest, QuotaExceeded,
    QuotaRequest, RegisterAgent, ReleaseRequest, Requirements,
};
use common::{subject, AgentId, Client, ErrorCode};
use futures::StreamExt;
use testkit::{eventually, start_service, System};

fn cpu(n: f64) -> Requirements {
    Requirements {
        resources: [("cpu".to_string(), n)].into(),
        ..Default::default()
    }
}

async fn register(c: &Client, agent: &str, cpu: f64) {
    c.register_agent(&RegisterAgent {
        agent_id: AgentId::new(agent).unwrap(),
        capabilities: vec![],
        labels: BTreeMap::new(),
        capacity: [("cpu".to_string(), cpu)].into(),
        heartbeat_interval_ms: 600_000,
    })
    .await
    .unwrap();
}

async fn allocate(
    c: &Client,
    owner: &str,
    n: f64,
    priority: i32,
) -> Result<Allocation, common::Error> {
    c.allocate(&AllocateRequest {
        owner: owner.into(),
        requirements: cpu(n),
        priority,
        allocation_id: None,
        deadline_ms: None,
        task: None,
        ttl_ms: None,
    })
    .await
}

fn quota(owner: &str, cpu: Option<f64>, preempt: bool) -> QuotaRequest {
    QuotaRequest {
        owner: owner.into(),
        limits: cpu
            .map(|n| [("cpu".to_string(), n)].into())
            .unwrap_or_default(),
        preempt,
    }
}

async fn pool_allocated(c: &Client) -> f64 {
    c.capacity(&CapacityRequest::default()).await.unwrap().pool["cpu"].allocated
}

/// What `owner`'s quota counts now, as `capacity.check` reports it.
async fn quota_used(c: &Client, owner: &str) -> Option<f64> {
    let cap = c
        .capacity(&CapacityRequest {
            requirements: None,
            owner: Some(owner.into()),
        })
        .await
        .unwrap();
    cap.quotas
        .get(owner)
        .map(|q| q.used.get("cpu").copied().unwrap_or(0.0))
}

#[tokio::test]
async fn a_quota_caps_an_owner_across_agents_and_release_frees_it() {
    let sys = System::start().await;
    let c = &sys.client;
    register(c, "w1", 4.0).await;
    register(c, "w2", 4.0).await;
    let set = c.set_quota(&quota("team", Some(5.0), false)).await.unwrap();
    assert!(set.applied);
    assert_eq!(set.quota.unwrap().limits["cpu"], 5.0);

    // 3 + 2 on two agents (no agent holds 5): the quota spans them.
    let a = allocate(c, "team/f1", 3.0, 0).await.unwrap();
    let b = allocate(c, "team", 2.0, 0).await.unwrap();
    assert_ne!(a.agent_id, b.agent_id);
    let err = allocate(c, "team/f2", 1.0, 0).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::QuotaExceeded, "{err}");
    let details: QuotaExceeded = serde_json::from_value(err.details).unwrap();
    assert_eq!(details.owner, "team/f2");
    assert_eq!(details.quota_owner, "team");
    assert_eq!(details.resource, "cpu");
    assert_eq!(
        (details.limit, details.in_use, details.requested),
        (5.0, 5.0, 1.0)
    );
    assert_eq!(pool_allocated(c).await, 5.0, "nothing was booked");
    // Other owners are not capped (and `teammate` is not below `team`).
    allocate(c, "teammate", 2.0, 0).await.unwrap();

    // The quota as a check for an owner below it shows it.
    let cap = c
        .capacity(&CapacityRequest {
            requirements: Some(cpu(1.0)),
            owner: Some("team/f9".into()),
        })
        .await
        .unwrap();
    let q = &cap.quotas["team"];
    assert_eq!(
        (q.limits["cpu"], q.used["cpu"], q.allocations),
        (5.0, 5.0, 2)
    );

    // Releasing frees quota at once.
    assert!(
        c.release(&ReleaseRequest {
            allocation_id: a.allocation_id.clone(),
            agent_id: None,
        })
        .await
        .unwrap()
        .released
    );
    assert_eq!(quota_used(c, "team").await, Some(2.0));

    // A gang counts every member: 2 + 2 passes 5 - 2 even though each fits.
    let gang = GangRequest {
        owner: "team/g".into(),
        members: vec![cpu(2.0), cpu(2.0)],
        priority: 0,
    };
    let err = c.allocate_gang(&gang).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::QuotaExceeded, "{err}");
    assert_eq!(err.details["requested"], 4.0);
    assert_eq!(pool_allocated(c).await, 4.0, "no member stayed booked");
    let g = c
        .allocate_gang(&GangRequest {
            members: vec![cpu(1.5), cpu(1.5)],
            ..gang
        })
        .await
        .unwrap();
    assert!(g.allocations.iter().all(|a| !a.pending));
    assert_eq!(quota_used(c, "team").await, Some(5.0));

    // Clearing the quota lifts the cap.
    let cleared = c.set_quota(&quota("team", None, false)).await.unwrap();
    assert!(cleared.applied && cleared.quota.is_none());
    allocate(c, "team", 1.0, 0).await.unwrap();
    assert_eq!(quota_used(c, "team").await, None);
}

#[tokio::test]
async fn lowering_a_quota_reports_then_preempts_lowest_priority_first() {
    let sys = System::start().await;
    let c = &sys.client;
    let mut ev = sys.nats.subscribe(subject::EVENTS_ALL).await.unwrap();
    let mut changes = sys
        .nats
        .subscribe(subject::event::QUOTA_CHANGED)
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    register(c, "w1", 4.0).await;
    register(c, "w2", 4.0).await;
    // Allocations that exist before the quota are counted when it is set.
    let mut by_prio = BTreeMap::new();
    for prio in [5, 0, 2, 1] {
        by_prio.insert(prio, allocate(c, "o/t", 2.0, prio).await.unwrap());
    }
    let set = c.set_quota(&quota("o", Some(8.0), false)).await.unwrap();
    assert!(set.applied);
    assert_eq!(set.quota.unwrap().used["cpu"], 8.0);

    let report = c.set_quota(&quota("o", Some(4.0), false)).await.unwrap();
    assert!(!report.applied);
    let order: Vec<i32> = report.no_longer_fit.iter().map(|a| a.priority).collect();
    assert_eq!(order, [0, 1]);
    assert!(report.preempted.is_empty());
    assert_eq!(report.quota.unwrap().limits["cpu"], 8.0, "not applied");
    assert_eq!(pool_allocated(c).await, 8.0);

    let done = c.set_quota(&quota("o", Some(4.0), true)).await.unwrap();
    assert!(done.applied);
    let gone: Vec<i32> = done.preempted.iter().map(|a| a.priority).collect();
    assert_eq!(gone, [0, 1]);
    let q = done.quota.unwrap();
    assert_eq!((q.limits["cpu"], q.used["cpu"]), (4.0, 4.0));
    assert_eq!(pool_allocated(c).await, 4.0);
    for prio in [0, 1] {
        let want = by_prio[&prio].allocation_id.clone();
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = ev.next().await {
                if let Ok(Event {
                    kind:
                        EventKind::AllocationPreempted {
                            allocation_id,
                            reason,
                            ..
                        },
                    ..
                }) = serde_json::from_slice::<Event>(&msg.payload)
                {
                    if allocation_id == want {
                        return reason;
                    }
                }
            }
            String::new()
        })
        .await
        .unwrap();
        assert_eq!(found, "quota_reduced");
    }
    let err = allocate(c, "o", 0.5, 9).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::QuotaExceeded);

    // A new quota below what is held is refused without preempt, and left unset.
    let refused = c.set_quota(&quota("o/t", Some(1.0), false)).await.unwrap();
    assert!(!refused.applied && refused.quota.is_none());
    assert_eq!(refused.no_longer_fit.len(), 2);
    assert_eq!(quota_used(c, "o/t").await, None);

    // The changes in force were announced, in order; the refused ones were not.
    let mut limits = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), changes.next()).await
    {
        let e: Event = serde_json::from_slice(&msg.payload).unwrap();
        if let EventKind::QuotaChanged { owner, limits: l } = e.kind {
            limits.push((owner, l["cpu"]));
        }
    }
    assert_eq!(limits, [("o".to_string(), 8.0), ("o".to_string(), 4.0)]);
}

#[tokio::test]
async fn bad_quota_input_gets_typed_errors_and_changes_nothing() {
    let sys = System::start().await;
    let c = &sys.client;
    register(c, "w1", 4.0).await;
    c.set_quota(&quota("o", Some(2.0), false)).await.unwrap();
    let negative = c
        .set_quota(&quota("o", Some(-1.0), true))
        .await
        .unwrap_err();
    assert_eq!(negative.code, ErrorCode::ValidationFailed);
    let nobody = c.set_quota(&quota(" ", Some(1.0), true)).await.unwrap_err();
    assert_eq!(nobody.code, ErrorCode::ValidationFailed);
    let typo = sys
        .nats
        .request(
            subject::QUOTA_SET,
            r#"{"owner":"o","limit":{"cpu":1}}"#.into(),
        )
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&typo.payload).unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    let cap = c
        .capacity(&CapacityRequest {
            requirements: None,
            owner: None,
        })
        .await
        .unwrap();
    assert_eq!(cap.quotas.len(), 1);
    assert_eq!(cap.quotas["o"].limits["cpu"], 2.0);
}

/// A replica that dies after releasing on the agent but before forgetting the
/// hold leaves the quota counting an allocation that is gone; the sweep finds
/// it missing from a consistent view of the agents and frees the quota.
#[tokio::test]
async fn a_hold_left_by_a_crash_is_repaired_by_the_sweep() {
    let sys = System::start().await;
    let c = &sys.client;
    register(c, "w1", 4.0).await;
    c.set_quota(&quota("o", Some(3.0), false)).await.unwrap();
    let a = allocate(c, "o", 3.0, 0).await.unwrap();
    // The crash: the allocation leaves the agent record, the hold stays.
    let js = jetstream::new(sys.nats.clone());
    let agents = js.get_key_value(common::nats::KV_AGENTS).await.unwrap();
    let entry = agents.entry("w1").await.unwrap().unwrap();
    let mut rec: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
    rec["allocations"]
        .as_object_mut()
        .unwrap()
        .remove(a.allocation_id.as_str());
    agents
        .update(
            "w1",
            serde_json::to_vec(&rec).unwrap().into(),
            entry.revision,
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the leaked hold dropped",
        || async { (quota_used(c, "o").await == Some(0.0)).then_some(()) },
    )
    .await;
    allocate(c, "o", 3.0, 0).await.unwrap();
}

/// A tiny deterministic generator, so a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[tokio::test]
async fn two_replicas_never_exceed_a_quota_under_concurrent_requests() {
    const AGENTS: usize = 16;
    const CLIENTS: u64 = 8;
    const OPS_PER_CLIENT: u64 = 24;
    const LIMIT: f64 = 6.0;
    let sys = System::start().await;
    let second = start_service("allocator", sys.server.config());
    let ping = format!("{}.allocator", subject::SRV_PING);
    eventually(
        Duration::from_secs(10),
        "two allocator replicas",
        || async {
            let inbox = sys.nats.new_inbox();
            let mut sub = sys.nats.subscribe(inbox.clone()).await.unwrap();
            sys.nats
                .publish_with_reply(ping.clone(), inbox, "".into())
                .await
                .unwrap();
            let mut n = 0;
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(300), sub.next()).await
            {
                n += 1;
            }
            (n == 2).then_some(())
        },
    )
    .await;
    // Each client places on its own two agents (by label), so that no agent's
    // history outgrows what the bucket keeps.
    for i in 0..AGENTS {
        sys.client
            .register_agent(&RegisterAgent {
                agent_id: AgentId::new(format!("w{i}")).unwrap(),
                capabilities: vec![],
                labels: [("slot".to_string(), (i as u64 % CLIENTS).to_string())].into(),
                capacity: [("cpu".to_string(), 4.0)].into(),
                heartbeat_interval_ms: 600_000,
            })
            .await
            .unwrap();
    }
    // The pool (64) is far larger than the quota: only the quota refuses.
    sys.client
        .set_quota(&quota("tenant", Some(LIMIT), false))
        .await
        .unwrap();

    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        let client = Client::new(sys.server.connect().await).with_timeout(Duration::from_secs(20));
        clients.push(tokio::spawn(async move {
            let mut rng = Lcg(k + 7);
            let mut held: Vec<Allocation> = Vec::new();
            let (mut made, mut released, mut refused) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..OPS_PER_CLIENT {
                if !held.is_empty() && rng.next(3) == 0 {
                    let a = held.swap_remove(rng.next(held.len() as u64) as usize);
                    let r = client
                        .release(&ReleaseRequest {
                            allocation_id: a.allocation_id.clone(),
                            agent_id: Some(a.agent_id.clone()),
                        })
                        .await
                        .unwrap();
                    assert!(r.released);
                    released.push(a.allocation_id);
                } else {
                    let req = Requirements {
                        labels: [("slot".to_string(), k.to_string())].into(),
                        ..cpu(0.5 * (1 + rng.next(3)) as f64)
                    };
                    let booked = client
                        .allocate(&AllocateRequest {
                            owner: format!("tenant/c{k}"),
                            requirements: req,
                            priority: 0,
                            allocation_id: None,
                            deadline_ms: None,
                            task: None,
                            ttl_ms: None,
                        })
                        .await;
                    match booked {
                        Ok(a) => {
                            made.push(a.allocation_id.clone());
                            held.push(a);
                        }
                        Err(e) => {
                            assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e}");
                            let over: QuotaExceeded =
                                serde_json::from_value(e.details.clone()).unwrap();
                            refused.push(over);
                        }
                    }
                }
            }
            (made, released, refused)
        }));
    }
    let (mut made, mut released, mut refused) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
    for c in clients {
        let (m, r, n) = c.await.unwrap();
        made.extend(m);
        released.extend(r);
        refused.extend(n);
    }
    // More booked than the quota holds at once (each booking is at least
    // 0.5), so released capacity was booked again. How many more depends on
    // the interleaving: a client that finishes first keeps what it holds.
    assert!(
        made.len() as f64 * 0.5 > LIMIT,
        "the quota's capacity was reused: {} allocations",
        made.len()
    );
    // The quota was reached: each refusal names what the quota counted, and
    // that is within the limit yet too much for the request.
    assert!(!refused.is_empty(), "the quota was reached");
    for over in &refused {
        assert_eq!(over.limit, LIMIT);
        assert!(over.in_use <= LIMIT + 1e-9, "{over:?}");
        assert!(over.in_use + over.requested > LIMIT, "{over:?}");
    }

    // The checker: replay every revision of the agents bucket in order (one
    // stream, so revisions order all agents' writes) and sum the confirmed
    // allocations of the tenant at each step.
    let js = jetstream::new(sys.nats.clone());
    let kv = js.get_key_value(common::nats::KV_AGENTS).await.unwrap();
    let mut writes: Vec<(u64, String, serde_json::Value)> = Vec::new();
    for i in 0..AGENTS {
        let key = format!("w{i}");
        let mut history = kv.history(&key).await.unwrap();
        while let Some(entry) = history.next().await {
            let entry = entry.unwrap();
            writes.push((
                entry.revision,
                key.clone(),
                serde_json::from_slice(&entry.value).unwrap(),
            ));
        }
    }
    writes.sort_by_key(|(rev, _, _)| *rev);
    let revisions: BTreeSet<u64> = writes.iter().map(|(r, _, _)| *r).collect();
    assert_eq!(
        revisions.len() as u64,
        *revisions.iter().max().unwrap(),
        "KV history lost revisions; raise the bucket history or lower the load"
    );
    let tenant_cpu = |rec: &serde_json::Value| -> f64 {
        rec["allocations"]
            .as_object()
            .unwrap()
            .values()
            .filter(|a| !a["pending"].as_bool().unwrap_or(false))
            .filter(|a| a["owner"].as_str().unwrap().starts_with("tenant/"))
            .map(|a| a["resources"]["cpu"].as_f64().unwrap())
            .sum()
    };
    let mut now: BTreeMap<String, f64> = BTreeMap::new();
    // (How close the confirmed bookings came to the limit depends on how many
    // were still pending at each instant, so only the bound is asserted.)
    for (rev, key, rec) in &writes {
        now.insert(key.clone(), tenant_cpu(rec));
        let total: f64 = now.values().sum();
        assert!(
            total <= LIMIT + 1e-9,
            "at revision {rev} the tenant holds {total} of a {LIMIT} quota"
        );
    }

    // Every revision of the quota book still in history is within its limits.
    let quotas = js.get_key_value(common::nats::KV_QUOTAS).await.unwrap();
    let mut history = quotas.history("pool").await.unwrap();
    while let Some(entry) = history.next().await {
        let book: allocator::machine::QuotaBook =
            serde_json::from_slice(&entry.unwrap().value).unwrap();
        assert_eq!(book.within_limits(), Ok(()));
    }

    // Every successful allocation is accounted for, and the quota counts
    // exactly what is live.
    let mut live = BTreeSet::new();
    let mut live_cpu = 0.0;
    for i in 0..AGENTS {
        let entry = kv.entry(format!("w{i}")).await.unwrap().unwrap();
        let rec: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
        for (id, a) in rec["allocations"].as_object().unwrap() {
            live.insert(id.clone());
            live_cpu += a["resources"]["cpu"].as_f64().unwrap();
        }
    }
    let expected: BTreeSet<String> = made.difference(&released).map(|a| a.to_string()).collect();
    assert_eq!(live, expected);
    // A release forgets its hold best effort (a forget that kept losing its
    // compare-and-set under this load leaves it to the sweep), so the count
    // comes to exactly what is live, if not at once.
    let mut used = 0.0;
    let settled = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            used = quota_used(&sys.client, "tenant").await.unwrap();
            if (used - live_cpu).abs() < 1e-9 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "{used} counted, {live_cpu} live");
    second.stop().await.unwrap();
}

/// A quota set while its owner's allocations are being booked (on two
/// replicas) counts every one of them: each booking either sees the new quota
/// or is seen by its first count, so what is counted is exactly what is live.
#[tokio::test]
async fn a_quota_set_during_a_burst_counts_every_allocation() {
    let sys = System::start().await;
    let second = start_service("allocator", sys.server.config());
    testkit::wait_for_service(&sys.nats, "allocator").await;
    for i in 0..8 {
        register(&sys.client, &format!("w{i}"), 64.0).await;
    }
    // Each client books until it has seen the quota set, then 5 more, so the
    // quota lands in the middle of the burst however fast bookings are.
    let set_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for k in 0..6u64 {
        let client = Client::new(sys.server.connect().await).with_timeout(Duration::from_secs(20));
        let (set_done, started) = (set_done.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            let mut after = 0;
            for i in 0.. {
                let a = allocate(&client, &format!("burst/c{k}/{i}"), 0.5, 0)
                    .await
                    .unwrap();
                made.push(a);
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if set_done.load(std::sync::atomic::Ordering::SeqCst) {
                    after += 1;
                    if after == 5 {
                        break;
                    }
                }
            }
            made
        }));
    }
    eventually(Duration::from_secs(10), "the burst under way", || async {
        (started.load(std::sync::atomic::Ordering::SeqCst) >= 12).then_some(())
    })
    .await;
    // Counting during a burst may find the agents changing for longer than
    // it tries, or outlast the request on a loaded machine: the reply then
    // says to retry (`unavailable`, or no reply), as a client would.
    let mut tries = 0;
    let set = loop {
        tries += 1;
        match sys
            .client
            .set_quota(&quota("burst", Some(1000.0), false))
            .await
        {
            Ok(set) => break set,
            Err(e)
                if tries < 5 && matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) =>
            {
                eprintln!("quota.set try {tries}: {e:?}; retrying");
            }
            Err(e) => panic!("quota.set failed after {tries} tries: {e:?}"),
        }
    };
    assert!(set.applied);
    let set_at = common::now_ms();
    set_done.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut made = Vec::new();
    for t in tasks {
        made.extend(t.await.unwrap());
    }
    let booked = made.len();
    assert!(
        made.iter().any(|a| a.created_at_ms < set_at)
            && made.iter().any(|a| a.created_at_ms > set_at),
        "the quota was set in the middle of the burst"
    );
    // Counted as soon as the burst is over.
    assert_eq!(
        quota_used(&sys.client, "burst").await,
        Some(booked as f64 * 0.5)
    );
    let cap = sys
        .client
        .capacity(&CapacityRequest::default())
        .await
        .unwrap();
    assert_eq!(cap.quotas["burst"].allocations, booked);
    second.stop().await.unwrap();
}

/// A flow with an owner runs under the owner's quota from its first
/// placement: its tasks' allocations are owned `{owner}/{flow}/{task}`, so
/// `team-q`'s quota of 1 CPU lets one of its two tasks run at a time though
/// the agent has room for four, and check-system finds nothing wrong.
#[tokio::test]
async fn a_flow_with_an_owner_runs_within_the_owners_quota() {
    use crate::orchestrator::{cpu_task, spawn_agent, wait_finished};
    use common::msg::{FlowSpec, FlowState, TaskState};
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    let sys = System::start().await;
    let c = &sys.client;
    c.set_quota(&quota("team-q", Some(1.0), false))
        .await
        .unwrap();
    // The agent finishes a task only when the test hands it a permit.
    let permits = Arc::new(Semaphore::new(0));
    let agent = {
        let permits = permits.clone();
        spawn_agent(&sys.nats, "q", 4.0, move |_| {
            let permits = permits.clone();
            async move {
                permits.acquire().await.unwrap().forget();
                Ok(serde_json::json!(null))
            }
        })
    };
    crate::orchestrator::wait_registered(c, "q").await;
    let flow_id = common::FlowId::new("owned").unwrap();
    let mut spec = FlowSpec::new("owned", vec![cpu_task("a", &[]), cpu_task("b", &[])]);
    spec.id = Some(flow_id.clone());
    spec.owner = Some("team-q".into());
    c.create_flow(&spec).await.unwrap();

    let running = eventually(Duration::from_secs(20), "one task running", || async {
        let s = c.flow_status(&flow_id).await.ok()?;
        let running: Vec<_> = s
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .map(|t| t.task_id.to_string())
            .collect();
        (running.len() == 1).then(|| running[0].clone())
    })
    .await;
    assert_eq!(quota_used(c, "team-q").await, Some(1.0));
    // The other task's first placement may still be on its way: explain
    // names the quota once it has been refused (a stays running meanwhile).
    eventually(
        Duration::from_secs(10),
        "explain to name the quota",
        || async {
            let explained = c
                .explain_flow(&common::msg::ExplainRequest {
                    flow_id: flow_id.clone(),
                    task_id: None,
                })
                .await
                .ok()?;
            let text = serde_json::to_string(&explained).unwrap();
            text.contains("quota").then_some(())
        },
    )
    .await;
    let s = c.flow_status(&flow_id).await.unwrap();
    assert_eq!(
        s.tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .count(),
        1,
        "the quota holds the other task back while {running} runs"
    );
    // The agent holds the running task's allocation alone. The other task's
    // placement is retried meanwhile, and each try books on the agent before
    // the quota refuses it and takes it back: seen mid-try, the agent's
    // allocated is 2, so the agent is read until it is between tries.
    eventually(
        Duration::from_secs(10),
        "the agent holding 1 cpu",
        || async {
            let cap = c.capacity(&CapacityRequest::default()).await.ok()?;
            let held = &cap.agents[&AgentId::new("q").unwrap()]["cpu"];
            (held.allocated == 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(quota_used(c, "team-q").await, Some(1.0));
    eventually(Duration::from_secs(10), "a clean system check", || async {
        let v = c.validate_system().await.ok()?;
        v.violations.is_empty().then_some(())
    })
    .await;

    permits.add_permits(2);
    let done = wait_finished(c, &flow_id, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let _ = agent.0.send(());
}
