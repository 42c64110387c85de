//! The allocator over the wire against a real nats-server: heartbeat loss
//! releases allocations with an event, deregistration drains, reservation
//! windows (before/during/after), gangs all-or-nothing, spread and
//! anti-affinity, preemption order, rebalancing of movable allocations, typed
//! errors for bad input, requests past their deadline booking nothing, and — with two replicas and 500 concurrent requests —
//! no agent's ledger over capacity at any revision in KV history.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    AdjustRequest, AgentStatus, AllocateRequest, Allocation, CancelReservation, CapacityRequest,
    Event, EventKind, GangRequest, OptimizeRequest, Policy, RegisterAgent, ReleaseRequest,
    Requirements, ReserveRequest,
};
use common::{subject, AgentId, Client, ErrorCode};
use futures::StreamExt;
use testkit::{eventually, start_service, System};

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn cpu(n: f64) -> Requirements {
    Requirements {
        resources: [("cpu".to_string(), n)].into(),
        ..Default::default()
    }
}

async fn register(c: &Client, agent: &str, cpu: f64, heartbeat_ms: u64) {
    c.register_agent(&RegisterAgent {
        agent_id: id(agent),
        capabilities: vec![],
        labels: [("zone".to_string(), "eu".to_string())].into(),
        capacity: [("cpu".to_string(), cpu)].into(),
        heartbeat_interval_ms: heartbeat_ms,
    })
    .await
    .unwrap();
}

async fn allocate(
    c: &Client,
    owner: &str,
    req: Requirements,
    priority: i32,
) -> Result<Allocation, common::Error> {
    c.allocate(&AllocateRequest {
        owner: owner.into(),
        requirements: req,
        priority,
        allocation_id: None,
        deadline_ms: None,
        task: None,
        ttl_ms: None,
    })
    .await
}

/// Every allocator event from now on.
async fn events(sys: &System) -> async_nats::Subscriber {
    let sub = sys.nats.subscribe(subject::EVENTS_ALL).await.unwrap();
    sys.nats.flush().await.unwrap();
    sub
}

async fn next_event(
    sub: &mut async_nats::Subscriber,
    what: &str,
    pred: impl Fn(&EventKind) -> bool,
) -> EventKind {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = sub.next().await {
            if let Ok(e) = serde_json::from_slice::<Event>(&msg.payload) {
                if pred(&e.kind) {
                    return Some(e.kind);
                }
            }
        }
        None
    })
    .await;
    found
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no {what} event"))
}

async fn allocated_on(c: &Client, agent: &str) -> f64 {
    let cap = c.capacity(&CapacityRequest::default()).await.unwrap();
    cap.agents[&id(agent)]["cpu"].allocated
}

#[tokio::test]
async fn heartbeat_loss_marks_the_agent_lost_releases_and_says_so() {
    let sys = System::start().await;
    // Two replicas sweep for lost agents; the compare-and-set lets only one act.
    let second = start_service("allocator", sys.server.config());
    let c = &sys.client;
    let mut ev = events(&sys).await;
    register(c, "w1", 2.0, 150).await;
    let held = allocate(c, "flow-1/task-a", cpu(1.0), 0).await.unwrap();
    // A few heartbeats, then silence.
    for _ in 0..3 {
        sys.nats
            .publish(subject::heartbeat(&id("w1")), r#"{"agent_id":"w1"}"#.into())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lost = next_event(&mut ev, "agent lost", |k| {
        matches!(k, EventKind::AgentLost { .. })
    })
    .await;
    let EventKind::AgentLost {
        agent_id,
        released,
        last_seen_ms,
    } = lost
    else {
        unreachable!()
    };
    assert_eq!(agent_id.as_str(), "w1");
    assert!(last_seen_ms > 0);
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].allocation_id, held.allocation_id);
    assert_eq!(released[0].owner, "flow-1/task-a");

    let cap = c.capacity(&CapacityRequest::default()).await.unwrap();
    assert_eq!(cap.agent_status[&id("w1")], AgentStatus::Lost);
    assert_eq!(cap.agents[&id("w1")]["cpu"].allocated, 0.0);
    let err = allocate(c, "x", cpu(1.0), 0).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    let again = c
        .release(&ReleaseRequest {
            allocation_id: held.allocation_id.clone(),
            agent_id: Some(id("w1")),
        })
        .await
        .unwrap();
    assert!(!again.released, "released once, by the loss");

    // Registering again brings it back (with a long interval so it stays).
    register(c, "w1", 2.0, 60_000).await;
    let back = allocate(c, "x", cpu(2.0), 0).await.unwrap();
    assert_eq!(back.agent_id.as_str(), "w1");
    // Exactly one loss event, however many replicas swept.
    tokio::time::sleep(Duration::from_millis(600)).await;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(100), ev.next()).await {
        let e: Event = serde_json::from_slice(&msg.payload).unwrap();
        assert!(
            !matches!(e.kind, EventKind::AgentLost { .. }),
            "a second loss event: {e:?}"
        );
    }
    second.stop().await.unwrap();
}

#[tokio::test]
async fn deregistered_agents_drain() {
    let sys = System::start().await;
    let c = &sys.client;
    let mut ev = events(&sys).await;
    register(c, "w1", 4.0, 60_000).await;
    let held = allocate(c, "o", cpu(1.0), 0).await.unwrap();
    let info = c.deregister_agent(&id("w1")).await.unwrap();
    assert_eq!(info.status, AgentStatus::Draining);
    assert_eq!(info.allocations, 1);
    next_event(&mut ev, "deregistered", |k| {
        matches!(k, EventKind::AgentDeregistered { .. })
    })
    .await;
    let err = allocate(c, "o", cpu(1.0), 0).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert_eq!(err.details["short"]["reason"], "not_accepting");
    // Existing work finishes and is released as usual.
    let r = c
        .release(&ReleaseRequest {
            allocation_id: held.allocation_id,
            agent_id: Some(id("w1")),
        })
        .await
        .unwrap();
    assert!(r.released);
    assert_eq!(
        c.deregister_agent(&id("ghost")).await.unwrap_err().code,
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn reservation_windows_before_during_and_after() {
    let sys = System::start().await;
    let c = &sys.client;
    let mut ev = events(&sys).await;
    register(c, "w1", 4.0, 60_000).await;
    let start = common::now_ms() + 1_500;
    let end = start + 1_500;
    let reservation = c
        .reserve(&ReserveRequest {
            owner: "team".into(),
            requirements: cpu(3.0),
            start_ms: start,
            end_ms: end,
            agent_id: None,
        })
        .await
        .unwrap();
    assert_eq!(reservation.agent_id.as_str(), "w1");

    // Overlapping reservations that cannot all be honoured are refused; one
    // right after the window is fine.
    let overlap = ReserveRequest {
        owner: "other".into(),
        requirements: cpu(2.0),
        start_ms: start + 500,
        end_ms: end + 500,
        agent_id: None,
    };
    assert_eq!(
        c.reserve(&overlap).await.unwrap_err().code,
        ErrorCode::NoCapacity
    );
    let later = c
        .reserve(&ReserveRequest {
            start_ms: end,
            end_ms: end + 1_000,
            requirements: cpu(4.0),
            ..overlap.clone()
        })
        .await
        .unwrap();
    let cancelled = c
        .cancel_reservation(&CancelReservation {
            reservation_id: later.reservation_id.clone(),
            agent_id: None,
        })
        .await
        .unwrap();
    assert!(cancelled.cancelled);
    let twice = c
        .cancel_reservation(&CancelReservation {
            reservation_id: later.reservation_id,
            agent_id: None,
        })
        .await
        .unwrap();
    assert!(!twice.cancelled);

    // Before: held for the window already (an open-ended allocation could
    // still be running then), and the owner cannot draw from it yet.
    let cap = c.capacity(&CapacityRequest::default()).await.unwrap();
    assert_eq!(cap.pool["cpu"].reserved, 3.0);
    assert_eq!(cap.pool["cpu"].free, 1.0);
    assert_eq!(
        allocate(c, "team/t1", cpu(2.0), 0).await.unwrap_err().code,
        ErrorCode::NoCapacity
    );
    let other = allocate(c, "other", cpu(1.0), 0).await.unwrap();
    assert!(other.reservation_id.is_none());

    // During: the owner (and owners below it) draw from it; others see it used.
    tokio::time::sleep(Duration::from_millis(
        start.saturating_sub(common::now_ms()) + 50,
    ))
    .await;
    let drawn = allocate(c, "team/t1", cpu(3.0), 0).await.unwrap();
    assert_eq!(
        drawn.reservation_id.as_ref(),
        Some(&reservation.reservation_id)
    );
    assert_eq!(
        allocate(c, "other", cpu(1.0), 0).await.unwrap_err().code,
        ErrorCode::NoCapacity
    );

    // After: it frees itself, and what drew from it ends with it.
    let ended = next_event(
        &mut ev,
        "reservation ended",
        |k| matches!(k, EventKind::ReservationEnded { reason, .. } if reason == "expired"),
    )
    .await;
    assert!(
        matches!(ended, EventKind::ReservationEnded { reservation_id, .. } if reservation_id == reservation.reservation_id)
    );
    let pre = next_event(&mut ev, "preempted", |k| {
        matches!(k, EventKind::AllocationPreempted { .. })
    })
    .await;
    assert!(
        matches!(pre, EventKind::AllocationPreempted { allocation_id, reason, .. }
        if allocation_id == drawn.allocation_id && reason == "reservation_ended")
    );
    let cap = c.capacity(&CapacityRequest::default()).await.unwrap();
    assert_eq!(cap.pool["cpu"].reserved, 0.0);
    assert_eq!(cap.pool["cpu"].free, 3.0);
    allocate(c, "other", cpu(3.0), 0).await.unwrap();
}

#[tokio::test]
async fn gangs_are_placed_all_or_nothing() {
    let sys = System::start().await;
    let c = &sys.client;
    for a in ["a", "b", "c"] {
        register(c, a, 2.0, 60_000).await;
    }
    let member = Requirements {
        anti_affinity: Some("replicas".into()),
        ..cpu(2.0)
    };
    let err = c
        .allocate_gang(&GangRequest {
            owner: "job".into(),
            members: vec![member.clone(); 4],
            priority: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert_eq!(err.details["member"], 3);
    let cap = c.capacity(&CapacityRequest::default()).await.unwrap();
    assert_eq!(
        cap.pool["cpu"].allocated, 0.0,
        "nothing booked by a failed gang"
    );

    let gang = c
        .allocate_gang(&GangRequest {
            owner: "job".into(),
            members: vec![member; 3],
            priority: 0,
        })
        .await
        .unwrap();
    let agents: BTreeSet<&str> = gang
        .allocations
        .iter()
        .map(|a| a.agent_id.as_str())
        .collect();
    assert_eq!(
        agents.len(),
        3,
        "anti-affinity puts each member on its own agent"
    );
    assert!(gang.allocations.iter().all(|a| !a.pending));
    let empty = c
        .allocate_gang(&GangRequest {
            owner: "job".into(),
            members: vec![],
            priority: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code, ErrorCode::ValidationFailed);
}

#[tokio::test]
async fn spread_and_anti_affinity_choose_the_agent() {
    let sys = System::start().await;
    let c = &sys.client;
    register(c, "small", 2.0, 60_000).await;
    register(c, "big", 8.0, 60_000).await;
    assert_eq!(
        allocate(c, "o", cpu(1.0), 0)
            .await
            .unwrap()
            .agent_id
            .as_str(),
        "small"
    );
    let spread = Requirements {
        policy: Policy::Spread,
        ..cpu(1.0)
    };
    assert_eq!(
        allocate(c, "o", spread, 0).await.unwrap().agent_id.as_str(),
        "big"
    );
    let apart = Requirements {
        anti_affinity: Some("db".into()),
        ..cpu(0.5)
    };
    let first = allocate(c, "o", apart.clone(), 0).await.unwrap();
    let second = allocate(c, "o", apart.clone(), 0).await.unwrap();
    assert_ne!(first.agent_id, second.agent_id);
    let err = allocate(c, "o", apart, 0).await.unwrap_err();
    assert_eq!(err.details["short"]["reason"], "anti_affinity");
    // Per-label view of the pool.
    let cap = c
        .capacity(&CapacityRequest {
            requirements: Some(cpu(7.0)),
            owner: None,
        })
        .await
        .unwrap();
    assert_eq!(cap.labels["zone=eu"]["cpu"].capacity, 10.0);
    assert_eq!(cap.fits, Some(false));
    assert_eq!(cap.no_fit.unwrap().best_candidate.unwrap().as_str(), "big");
}

#[tokio::test]
async fn adjusting_capacity_reports_then_preempts_lowest_priority_first() {
    let sys = System::start().await;
    let c = &sys.client;
    let mut ev = events(&sys).await;
    register(c, "w1", 4.0, 60_000).await;
    let mut by_prio = BTreeMap::new();
    for prio in [5, 0, 2, 1] {
        by_prio.insert(
            prio,
            allocate(c, &format!("flow/t{prio}"), cpu(1.0), prio)
                .await
                .unwrap(),
        );
    }
    let shrink = AdjustRequest {
        agent_id: id("w1"),
        capacity: [("cpu".to_string(), 2.0)].into(),
        preempt: false,
    };
    let report = c.adjust_capacity(&shrink).await.unwrap();
    assert!(!report.applied);
    let order: Vec<i32> = report.no_longer_fit.iter().map(|a| a.priority).collect();
    assert_eq!(order, [0, 1]);
    assert_eq!(report.capacity["cpu"], 4.0, "not applied without preempt");
    assert_eq!(allocated_on(c, "w1").await, 4.0);

    let done = c
        .adjust_capacity(&AdjustRequest {
            preempt: true,
            ..shrink
        })
        .await
        .unwrap();
    assert!(done.applied);
    let gone: Vec<i32> = done.preempted.iter().map(|a| a.priority).collect();
    assert_eq!(gone, [0, 1]);
    for prio in [0, 1] {
        let e = next_event(&mut ev, "preempted", |k| {
            matches!(k, EventKind::AllocationPreempted { .. })
        })
        .await;
        assert!(
            matches!(e, EventKind::AllocationPreempted { allocation_id, reason, .. }
            if allocation_id == by_prio[&prio].allocation_id && reason == "capacity_reduced")
        );
    }
    assert_eq!(allocated_on(c, "w1").await, 2.0);
    let missing = AdjustRequest {
        agent_id: id("nope"),
        capacity: BTreeMap::new(),
        preempt: false,
    };
    assert_eq!(
        c.adjust_capacity(&missing).await.unwrap_err().code,
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn optimize_plans_and_moves_only_movable_allocations() {
    let sys = System::start().await;
    let c = &sys.client;
    register(c, "hot", 4.0, 60_000).await;
    let mut held = Vec::new();
    for i in 0..4 {
        let req = Requirements {
            movable: i < 2,
            ..cpu(1.0)
        };
        held.push(allocate(c, "o", req, 0).await.unwrap());
    }
    register(c, "cold", 4.0, 60_000).await;
    let plan = c.optimize(&OptimizeRequest::default()).await.unwrap();
    assert_eq!(plan.moves.len(), 2);
    assert_eq!(plan.before.max, 1.0);
    assert_eq!(plan.after.max, 0.5);
    assert!(plan.applied.is_empty());
    assert_eq!(
        allocated_on(c, "hot").await,
        4.0,
        "a plan alone moves nothing"
    );

    let applied = c
        .optimize(&OptimizeRequest {
            apply: true,
            max_moves: None,
        })
        .await
        .unwrap();
    assert_eq!(applied.applied.len(), 2);
    assert_eq!(allocated_on(c, "hot").await, 2.0);
    assert_eq!(allocated_on(c, "cold").await, 2.0);
    // Released where it is now, even when named by where it was.
    let r = c
        .release(&ReleaseRequest {
            allocation_id: held[0].allocation_id.clone(),
            agent_id: Some(id("hot")),
        })
        .await
        .unwrap();
    assert!(r.released);
    assert_eq!(allocated_on(c, "cold").await, 1.0);
}

#[tokio::test]
async fn bad_allocator_input_gets_typed_errors() {
    let sys = System::start().await;
    let c = &sys.client;
    register(c, "w1", 4.0, 60_000).await;
    let now = common::now_ms();
    let backwards = ReserveRequest {
        owner: "o".into(),
        requirements: cpu(1.0),
        start_ms: now + 10,
        end_ms: now,
        agent_id: None,
    };
    assert_eq!(
        c.reserve(&backwards).await.unwrap_err().code,
        ErrorCode::ValidationFailed
    );
    let negative = AdjustRequest {
        agent_id: id("w1"),
        capacity: [("cpu".to_string(), -1.0)].into(),
        preempt: true,
    };
    assert_eq!(
        c.adjust_capacity(&negative).await.unwrap_err().code,
        ErrorCode::ValidationFailed
    );
    let typo = sys
        .nats
        .request(
            subject::CAPACITY_RESERVE,
            r#"{"owner":"o","requirements":{},"start_ms":1,"end_ms":2,"agnet":"w1"}"#.into(),
        )
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&typo.payload).unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    assert_eq!(
        allocate(c, " ", cpu(1.0), 0).await.unwrap_err().code,
        ErrorCode::ValidationFailed
    );
    // Nothing changed.
    let cap = c.capacity(&CapacityRequest::default()).await.unwrap();
    assert_eq!(cap.agents[&id("w1")]["cpu"].capacity, 4.0);
    assert_eq!(cap.pool["cpu"].reserved, 0.0);
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
async fn two_replicas_never_over_allocate_under_500_concurrent_requests() {
    const AGENTS: usize = 20;
    const CLIENTS: u64 = 10;
    const OPS_PER_CLIENT: u64 = 50;
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
    for i in 0..AGENTS {
        register(&sys.client, &format!("w{i:02}"), 4.0, 600_000).await;
    }

    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        let client = Client::new(sys.server.connect().await).with_timeout(Duration::from_secs(20));
        clients.push(tokio::spawn(async move {
            let mut rng = Lcg(k + 1);
            let mut held: Vec<Allocation> = Vec::new();
            let mut made = Vec::new();
            let mut released = Vec::new();
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
                    assert!(r.released, "a held allocation is released exactly once");
                    released.push(a.allocation_id);
                } else {
                    let req = Requirements {
                        policy: if rng.next(2) == 0 {
                            Policy::Spread
                        } else {
                            Policy::BestFit
                        },
                        ..cpu(0.5 * (1 + rng.next(4)) as f64)
                    };
                    match allocate(&client, &format!("client-{k}"), req, 0).await {
                        Ok(a) => {
                            made.push(a.allocation_id.clone());
                            held.push(a);
                        }
                        Err(e) => assert_eq!(e.code, ErrorCode::NoCapacity, "{e}"),
                    }
                }
            }
            (made, released)
        }));
    }
    let mut made = BTreeSet::new();
    let mut released = BTreeSet::new();
    for c in clients {
        let (m, r) = c.await.unwrap();
        made.extend(m);
        released.extend(r);
    }
    assert!(
        made.len() > 100,
        "enough successful allocations to mean something: {}",
        made.len()
    );

    // Every successful allocation is accounted for: released, or still held.
    let cap = sys
        .client
        .capacity(&CapacityRequest::default())
        .await
        .unwrap();
    let js = jetstream::new(sys.nats.clone());
    let kv = js.get_key_value(common::nats::KV_AGENTS).await.unwrap();
    let mut live = BTreeSet::new();
    let mut revisions = BTreeSet::new();
    let mut checked = 0;
    for i in 0..AGENTS {
        let key = format!("w{i:02}");
        let mut history = kv.history(&key).await.unwrap();
        let mut last = None;
        while let Some(entry) = history.next().await {
            let entry = entry.unwrap();
            revisions.insert(entry.revision);
            let rec: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
            // The checker: at this revision, is the agent over its capacity?
            let capacity = rec["capacity"]["cpu"].as_f64().unwrap();
            let allocated: f64 = rec["allocations"]
                .as_object()
                .unwrap()
                .values()
                .map(|a| a["resources"]["cpu"].as_f64().unwrap())
                .sum();
            assert!(
                allocated <= capacity + 1e-9,
                "{key} at revision {}: {allocated} allocated of {capacity}",
                entry.revision
            );
            checked += 1;
            last = Some(rec);
        }
        let last = last.unwrap();
        live.extend(last["allocations"].as_object().unwrap().keys().cloned());
        assert_eq!(cap.agents[&id(&key)]["cpu"].allocated, {
            last["allocations"]
                .as_object()
                .unwrap()
                .values()
                .map(|a| a["resources"]["cpu"].as_f64().unwrap())
                .sum::<f64>()
        });
    }
    // The history is complete: every revision of the bucket was checked (none aged out).
    let max = *revisions.iter().max().unwrap();
    assert_eq!(
        revisions.len() as u64,
        max,
        "KV history lost revisions; raise the bucket history or lower the load"
    );
    let expected: BTreeSet<String> = made.difference(&released).map(|a| a.to_string()).collect();
    assert_eq!(live, expected);
    assert!(checked >= made.len() + released.len());
    second.stop().await.unwrap();
}

#[tokio::test]
async fn an_allocate_request_past_its_deadline_books_nothing() {
    let sys = System::start().await;
    let c = &sys.client;
    register(c, "late", 2.0, 60_000).await;
    let id = common::AllocationId::new("late-1").unwrap();
    let mut req = AllocateRequest {
        owner: "o".into(),
        requirements: cpu(1.0),
        priority: 0,
        allocation_id: Some(id.clone()),
        // A caller that stopped waiting a second ago: read this late, the
        // allocator must not book behind its back.
        deadline_ms: Some(common::now_ms() - 1_000),
        task: None,
        ttl_ms: None,
    };
    let err = c.allocate(&req).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Timeout, "{err}");
    assert_eq!(allocated_on(c, "late").await, 0.0);
    // In time, it books; a late retry of a booked id still gets it back.
    req.deadline_ms = None;
    let a = c.allocate(&req).await.unwrap();
    assert_eq!(allocated_on(c, "late").await, 1.0);
    req.deadline_ms = Some(common::now_ms() - 1_000);
    assert_eq!(c.allocate(&req).await.unwrap(), a);
    // Released, the id stays released however late a request for it comes.
    c.release(&ReleaseRequest {
        allocation_id: id,
        agent_id: None,
    })
    .await
    .unwrap();
    assert_eq!(c.allocate(&req).await.unwrap_err().code, ErrorCode::Timeout);
    assert_eq!(allocated_on(c, "late").await, 0.0);
}
