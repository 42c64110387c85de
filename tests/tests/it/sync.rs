//! The synchronizer over the wire: scopes and their conflict policies under
//! concurrent writers, history and reads at a revision, deletion and the watch
//! subject, schema and invariant validation, synchronize rounds with a silent
//! agent, and a 50-agent sync point taken, completed, diffed and rolled back
//! after a burst of updates.

use std::collections::BTreeMap;
use std::time::Duration;

use common::msg::*;
use common::{subject, AgentId, ErrorCode, ScopeId};
use coordkit::agent::SyncFollower;
use futures::StreamExt;
use serde_json::{json, Value};
use testkit::System;

fn agent(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn scope(s: &str) -> ScopeId {
    ScopeId::new(s).unwrap()
}

fn put(scope: &ScopeId, a: &AgentId, expected_revision: u64, doc: Value) -> StatePut {
    StatePut {
        agent_id: a.clone(),
        expected_revision,
        doc,
        scope: scope.clone(),
        clock: None,
    }
}

fn config(scope: &ScopeId, policy: ConflictPolicy) -> ScopeConfig {
    ScopeConfig {
        enforce_schema: false,
        scope: scope.clone(),
        policy,
        merge_fallback: MergeFallback::Lww,
        schema: None,
        invariants: vec![],
        shared: vec![],
    }
}

/// Agents that acknowledge every notice, running until the test ends.
async fn followers(sys: &System, agents: &[AgentId]) {
    for a in agents {
        let f = SyncFollower::subscribe(sys.nats.clone(), a.clone())
            .await
            .unwrap();
        tokio::spawn(f.run(|_| async { true }, std::future::pending::<()>()));
    }
}

#[tokio::test]
async fn reject_policy_lets_exactly_one_concurrent_writer_win_per_revision() {
    let sys = System::start().await;
    let s = scope("rej");
    let a = agent("a1");
    let mut conflicts = sys
        .nats
        .subscribe(subject::event::STATE_CONFLICT)
        .await
        .unwrap();
    let first = sys
        .client
        .state_put(&put(&s, &a, 0, json!({"n": 0})))
        .await
        .unwrap();
    let mut base = first.revision;
    for round in 0..3 {
        let writers = (0..8).map(|w| {
            let client = sys.client.clone();
            let req = put(&s, &a, base, json!({"n": round, "w": w}));
            async move { client.state_put(&req).await }
        });
        let results = futures::future::join_all(writers).await;
        let won: Vec<&StateDoc> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        for lost in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(lost.code, ErrorCode::Conflict);
            assert_eq!(lost.details["resolution"]["outcome"], json!("rejected"));
        }
        let now = sys
            .client
            .state_get_at(&StateGet {
                agent_id: a.clone(),
                scope: s.clone(),
                revision: None,
            })
            .await
            .unwrap();
        assert_eq!((now.revision, &now.doc), (won[0].revision, &won[0].doc));
        base = now.revision;
    }
    let ev = tokio::time::timeout(Duration::from_secs(5), conflicts.next())
        .await
        .unwrap()
        .unwrap();
    let ev: Event = serde_json::from_slice(&ev.payload).unwrap();
    assert!(matches!(
        ev.kind,
        EventKind::StateConflict {
            outcome: Some(ConflictOutcome::Rejected),
            ..
        }
    ));
}

#[tokio::test]
async fn lww_policy_keeps_the_later_clock_whatever_the_arrival_order() {
    let sys = System::start().await;
    let s = scope("lww");
    sys.client
        .scope_set(&config(&s, ConflictPolicy::Lww))
        .await
        .unwrap();
    let a = agent("a1");
    let base = sys
        .client
        .state_put(&put(&s, &a, 0, json!({"v": 0})))
        .await
        .unwrap();
    let clock = |ms: u64, node: &str| {
        Some(Hlc {
            physical_ms: common::now_ms() + ms,
            logical: 0,
            node: node.into(),
        })
    };
    let later = StatePut {
        clock: clock(60_000, "w-late"),
        ..put(&s, &a, base.revision, json!({"v": "late"}))
    };
    let earlier = StatePut {
        clock: clock(30_000, "w-early"),
        ..put(&s, &a, base.revision, json!({"v": "early"}))
    };
    // The later clock arrives first; the earlier one then loses its conflict.
    let first = sys.client.state_put(&later).await.unwrap();
    assert!(first.resolution.is_none());
    let second = sys.client.state_put(&earlier).await.unwrap();
    let res = second.resolution.unwrap();
    assert_eq!(res.outcome, ConflictOutcome::KeptCurrent);
    assert_eq!(second.doc, json!({"v": "late"}));
    // A writer with a still later clock on the stale base overwrites.
    let latest = StatePut {
        clock: clock(90_000, "w-latest"),
        ..put(&s, &a, base.revision, json!({"v": "latest"}))
    };
    let third = sys.client.state_put(&latest).await.unwrap();
    assert_eq!(
        third.resolution.unwrap().outcome,
        ConflictOutcome::Overwritten
    );

    // Concurrent writers with distinct clocks: the highest clock ends up stored.
    let now = sys
        .client
        .state_get_at(&StateGet {
            agent_id: a.clone(),
            scope: s.clone(),
            revision: None,
        })
        .await
        .unwrap();
    let writers = (0..10u64).map(|w| {
        let client = sys.client.clone();
        let req = StatePut {
            clock: clock(100_000 + w, &format!("w{w}")),
            ..put(&s, &a, now.revision, json!({"v": w}))
        };
        async move { client.state_put(&req).await.unwrap() }
    });
    futures::future::join_all(writers).await;
    let end = sys
        .client
        .state_get_at(&StateGet {
            agent_id: a.clone(),
            scope: s.clone(),
            revision: None,
        })
        .await
        .unwrap();
    assert_eq!(end.doc, json!({"v": 9}));
}

#[tokio::test]
async fn merge_policy_keeps_disjoint_edits_lists_overlaps_and_survives_an_aged_out_base() {
    let sys = System::start().await;
    let s = scope("mrg");
    let cfg = ScopeConfig {
        enforce_schema: false,
        merge_fallback: MergeFallback::Theirs,
        ..config(&s, ConflictPolicy::Merge)
    };
    sys.client.scope_set(&cfg).await.unwrap();
    let a = agent("a1");
    let base = sys
        .client
        .state_put(&put(
            &s,
            &a,
            0,
            json!({"plan": {"id": 1, "step": 0}, "notes": "x"}),
        ))
        .await
        .unwrap();
    // Concurrent writers on the same base, each touching its own key.
    let writers = (0..6).map(|w| {
        let client = sys.client.clone();
        let mut doc = json!({"plan": {"id": 1, "step": 0}, "notes": "x"});
        doc[format!("k{w}")] = json!(w);
        let req = put(&s, &a, base.revision, doc);
        async move { client.state_put(&req).await.unwrap() }
    });
    futures::future::join_all(writers).await;
    let now = sys
        .client
        .state_get_at(&StateGet {
            agent_id: a.clone(),
            scope: s.clone(),
            revision: None,
        })
        .await
        .unwrap();
    for w in 0..6 {
        assert_eq!(now.doc[format!("k{w}")], json!(w), "{}", now.doc);
    }
    // Both sides change /plan/step: the stored side wins (fallback `theirs`) and the leaf is listed.
    let stale = put(
        &s,
        &a,
        base.revision,
        json!({"plan": {"id": 1, "step": 5}, "notes": "y"}),
    );
    let theirs = put(
        &s,
        &a,
        now.revision,
        json!({"plan": {"id": 1, "step": 7}, "notes": "x", "k0": 0, "k1": 1, "k2": 2, "k3": 3, "k4": 4, "k5": 5}),
    );
    let t = sys.client.state_put(&theirs).await.unwrap();
    let merged = sys.client.state_put(&stale).await.unwrap();
    let res = merged.resolution.clone().unwrap();
    assert_eq!(res.outcome, ConflictOutcome::Merged);
    assert!(res.base_available);
    assert_eq!(res.conflicts, vec!["/plan/step"]);
    assert_eq!(merged.doc["plan"]["step"], json!(7));
    assert_eq!(merged.doc["notes"], json!("y"));
    assert!(merged.revision > t.revision);

    // Push the base out of the key's history (64 revisions), then merge against it.
    let mut rev = merged.revision;
    for i in 0..70 {
        let mut d = merged.doc.clone();
        d["counter"] = json!(i);
        rev = sys
            .client
            .state_put(&put(&s, &a, rev, d))
            .await
            .unwrap()
            .revision;
    }
    let gone = sys
        .client
        .state_get_at(&StateGet {
            agent_id: a.clone(),
            scope: s.clone(),
            revision: Some(base.revision),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code, ErrorCode::NotFound);
    let mut late_doc = merged.doc.clone();
    late_doc["counter"] = json!(-1);
    late_doc["from_old_base"] = json!(true);
    let aged = sys
        .client
        .state_put(&put(&s, &a, base.revision, late_doc))
        .await
        .unwrap();
    let res = aged.resolution.unwrap();
    assert!(!res.base_available);
    assert_eq!(res.conflicts, vec!["/counter"]);
    assert_eq!(aged.doc["from_old_base"], json!(true));
    assert_eq!(aged.doc["counter"], json!(69));
}

#[tokio::test]
async fn history_revisions_delete_and_the_watch_subject() {
    let sys = System::start().await;
    let s = scope("hist");
    let a = agent("a1");
    let mut watch = sys
        .nats
        .subscribe(subject::state_watch(&s, &a))
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let r1 = sys
        .client
        .state_put(&put(&s, &a, 0, json!({"v": 1})))
        .await
        .unwrap();
    let r2 = sys
        .client
        .state_put(&put(&s, &a, r1.revision, json!({"v": 2})))
        .await
        .unwrap();
    let at1 = sys
        .client
        .state_get_at(&StateGet {
            agent_id: a.clone(),
            scope: s.clone(),
            revision: Some(r1.revision),
        })
        .await
        .unwrap();
    assert_eq!(at1.doc, json!({"v": 1}));
    // A revision of another key is not this document's.
    let other = sys
        .client
        .state_put(&put(&s, &agent("a2"), 0, json!({})))
        .await
        .unwrap();
    let wrong = sys
        .client
        .state_get_at(&StateGet {
            agent_id: a.clone(),
            scope: s.clone(),
            revision: Some(other.revision),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code, ErrorCode::NotFound);
    // The default scope is a different document.
    assert_eq!(
        sys.client.state_get(&a).await.unwrap_err().code,
        ErrorCode::NotFound
    );

    let stale_delete = sys
        .client
        .state_delete(&StateDelete {
            agent_id: a.clone(),
            scope: s.clone(),
            expected_revision: Some(r1.revision),
        })
        .await
        .unwrap_err();
    assert_eq!(stale_delete.code, ErrorCode::Conflict);
    let del = sys
        .client
        .state_delete(&StateDelete {
            agent_id: a.clone(),
            scope: s.clone(),
            expected_revision: Some(r2.revision),
        })
        .await
        .unwrap();
    assert!(del.deleted);
    let again = sys
        .client
        .state_delete(&StateDelete {
            agent_id: a.clone(),
            scope: s.clone(),
            expected_revision: None,
        })
        .await
        .unwrap();
    assert!(!again.deleted);
    let h = sys
        .client
        .state_history(&StateHistoryRequest {
            agent_id: a.clone(),
            scope: s.clone(),
        })
        .await
        .unwrap();
    let shape: Vec<(bool, Value)> = h
        .entries
        .iter()
        .map(|e| (e.deleted, e.doc.clone()))
        .collect();
    assert_eq!(
        shape,
        vec![
            (false, json!({"v": 1})),
            (false, json!({"v": 2})),
            (true, Value::Null)
        ]
    );
    // Recreating after a delete starts again from revision 0.
    sys.client
        .state_put(&put(&s, &a, 0, json!({"v": 3})))
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let m = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap();
        let op = m
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .map(|v| v.as_str().to_owned());
        let doc = serde_json::from_slice::<StateDoc>(&m.payload)
            .ok()
            .map(|d| d.doc);
        seen.push((op, doc));
    }
    assert_eq!(
        seen,
        vec![
            (None, Some(json!({"v": 1}))),
            (None, Some(json!({"v": 2}))),
            (Some("DEL".to_owned()), None),
            (None, Some(json!({"v": 3}))),
        ]
    );
}

#[tokio::test]
async fn validation_reports_every_schema_and_invariant_violation_precisely() {
    let sys = System::start().await;
    let s = scope("val");
    let bad = sys
        .client
        .scope_set(&ScopeConfig {
            enforce_schema: false,
            schema: Some(json!({"type": "bogus"})),
            invariants: vec![Invariant::Agree {
                pointer: "plan".into(),
                agents: vec![],
            }],
            ..config(&s, ConflictPolicy::Reject)
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code, ErrorCode::ValidationFailed);
    assert_eq!(bad.details["problems"].as_array().unwrap().len(), 2);

    let cfg = ScopeConfig {
        enforce_schema: false,
        schema: Some(json!({
            "type": "object",
            "required": ["plan"],
            "properties": {"budget": {"type": "number", "minimum": 0}}
        })),
        invariants: vec![
            Invariant::Agree {
                pointer: "/plan/id".into(),
                agents: vec![],
            },
            Invariant::RegisteredAgent {
                pointer: "/leader".into(),
            },
            Invariant::SumAtMost {
                pointer: "/budget".into(),
                max: 10.0,
            },
        ],
        ..config(&s, ConflictPolicy::Reject)
    };
    sys.client.scope_set(&cfg).await.unwrap();
    assert_eq!(sys.client.scope_get(&s).await.unwrap(), cfg);
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: agent("boss"),
            capabilities: vec![],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1.0)].into(),
            heartbeat_interval_ms: 60_000,
        })
        .await
        .unwrap();
    let docs = [
        (
            "a1",
            json!({"plan": {"id": "p1"}, "budget": 6, "leader": "boss"}),
        ),
        (
            "a2",
            json!({"plan": {"id": "p1"}, "budget": 6, "leader": "ghost"}),
        ),
        ("a3", json!({"plan": {"id": "p2"}, "budget": -1})),
        ("a4", json!({"budget": 0})),
    ];
    for (a, d) in &docs {
        sys.client
            .state_put(&put(&s, &agent(a), 0, d.clone()))
            .await
            .unwrap();
    }
    let report = sys
        .client
        .validate_states(&ValidateRequest {
            scope: s.clone(),
            agents: vec![],
        })
        .await
        .unwrap();
    assert!(!report.valid);
    assert_eq!(report.checked.len(), 4);
    let got: Vec<(Option<String>, String, String)> = report
        .violations
        .iter()
        .map(|v| {
            (
                v.agent.as_ref().map(|a| a.to_string()),
                v.pointer.clone(),
                v.rule.clone(),
            )
        })
        .collect();
    let want =
        |a: Option<&str>, p: &str, r: &str| (a.map(str::to_owned), p.to_owned(), r.to_owned());
    assert_eq!(
        got,
        vec![
            want(Some("a3"), "/budget", "schema:/properties/budget/minimum"),
            want(Some("a4"), "", "schema:/required"),
            want(Some("a3"), "/plan/id", "agree"),
            want(Some("a4"), "/plan/id", "agree"),
            want(Some("a2"), "/leader", "registered_agent"),
            want(None, "/budget", "sum_at_most"),
        ]
    );
    // Naming an agent without a document reports it as missing.
    let named = sys
        .client
        .validate_states(&ValidateRequest {
            scope: s.clone(),
            agents: vec![agent("a1"), agent("nobody")],
        })
        .await
        .unwrap();
    assert_eq!(named.violations[0].rule, "missing");
    assert_eq!(named.violations[0].agent, Some(agent("nobody")));
}

#[tokio::test]
async fn synchronize_agrees_shared_keys_pushes_them_and_names_the_silent_agent() {
    let sys = System::start().await;
    let s = scope("syn");
    sys.client
        .scope_set(&ScopeConfig {
            enforce_schema: false,
            shared: vec!["/plan".into()],
            ..config(&s, ConflictPolicy::Lww)
        })
        .await
        .unwrap();
    let agents: Vec<AgentId> = (0..5).map(|i| agent(&format!("s{i}"))).collect();
    // s3 writes last, so its plan carries the latest clock.
    for i in [0, 1, 2, 4, 3] {
        let plan = if i == 3 { "new" } else { "old" };
        sys.client
            .state_put(&put(&s, &agents[i], 0, json!({"plan": plan, "own": i})))
            .await
            .unwrap();
    }
    let silent = agents[4].clone();
    followers(&sys, &agents[..4]).await;
    let report = sys
        .client
        .synchronize(&SynchronizeRequest {
            scope: s.clone(),
            agents: agents.clone(),
            shared: vec![],
            timeout_ms: 1500,
        })
        .await
        .unwrap();
    assert_eq!(report.divergences.len(), 1);
    assert_eq!(report.divergences[0].agreed, json!("new"));
    assert_eq!(report.divergences[0].from, Some(agents[3].clone()));
    assert!(!report.complete);
    let unacked: Vec<&AgentSyncResult> = report.agents.iter().filter(|r| !r.acked).collect();
    assert_eq!(unacked.len(), 1);
    assert_eq!(unacked[0].agent_id, silent);
    assert_eq!(unacked[0].error.as_ref().unwrap().code, ErrorCode::Timeout);
    for (i, a) in agents.iter().enumerate() {
        let d = sys
            .client
            .state_get_at(&StateGet {
                agent_id: a.clone(),
                scope: s.clone(),
                revision: None,
            })
            .await
            .unwrap();
        assert_eq!(d.doc, json!({"plan": "new", "own": i}));
    }
    // Under `reject`, divergence is refused and nothing is written.
    let r = scope("synrej");
    sys.client
        .scope_set(&ScopeConfig {
            enforce_schema: false,
            shared: vec!["/plan".into()],
            ..config(&r, ConflictPolicy::Reject)
        })
        .await
        .unwrap();
    sys.client
        .state_put(&put(&r, &agents[0], 0, json!({"plan": 1})))
        .await
        .unwrap();
    sys.client
        .state_put(&put(&r, &agents[1], 0, json!({"plan": 2})))
        .await
        .unwrap();
    let e = sys
        .client
        .synchronize(&SynchronizeRequest {
            scope: r.clone(),
            agents: agents[..2].to_vec(),
            shared: vec![],
            timeout_ms: 100,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(e.details["divergences"][0]["pointer"], json!("/plan"));
    let bad = sys
        .client
        .synchronize(&SynchronizeRequest {
            scope: r.clone(),
            agents: vec![],
            shared: vec![],
            timeout_ms: 100,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code, ErrorCode::BadRequest);
}

#[tokio::test]
async fn sync_point_over_50_agents_completes_names_the_silent_one_and_rolls_back_a_burst() {
    let sys = System::start().await;
    let s = scope("sp");
    let agents: Vec<AgentId> = (0..50).map(|i| agent(&format!("p{i:02}"))).collect();
    let mut revs = BTreeMap::new();
    for (i, a) in agents.iter().enumerate() {
        let d = sys
            .client
            .state_put(&put(&s, a, 0, json!({"step": 0, "id": i})))
            .await
            .unwrap();
        revs.insert(a.clone(), d.revision);
    }
    let silent = agents[17].clone();
    let others: Vec<AgentId> = agents.iter().filter(|a| **a != silent).cloned().collect();
    followers(&sys, &others).await;

    let sp = sys
        .client
        .syncpoint_initiate(&SyncPointInitiate {
            scope: s.clone(),
            agents: agents.clone(),
            label: "before burst".into(),
        })
        .await
        .unwrap();
    assert_eq!(sp.cut, revs);
    assert_eq!(sp.state, SyncPointState::Initiated);
    let done = sys
        .client
        .syncpoint_complete(&SyncPointWait {
            sync_point_id: sp.id.clone(),
            timeout_ms: 3000,
        })
        .await
        .unwrap();
    assert_eq!(done.state, SyncPointState::Incomplete);
    assert_eq!(done.missing, vec![silent.clone()]);
    assert_eq!(done.acked.len(), 49);

    // A burst of concurrent updates from every agent.
    let burst = agents.iter().cloned().map(|a| {
        let client = sys.client.clone();
        let s = s.clone();
        async move {
            let mut rev = client
                .state_get_at(&StateGet {
                    agent_id: a.clone(),
                    scope: s.clone(),
                    revision: None,
                })
                .await
                .unwrap()
                .revision;
            for step in 1..=5 {
                rev = client
                    .state_put(&put(&s, &a, rev, json!({"step": step, "burst": true})))
                    .await
                    .unwrap()
                    .revision;
            }
        }
    });
    futures::future::join_all(burst).await;
    let diff = sys.client.syncpoint_diff(&sp.id).await.unwrap();
    assert!(!diff.unchanged);
    assert_eq!(diff.agents.len(), 50);
    let ops: Vec<(String, DiffOp)> = diff.agents[0]
        .changes
        .iter()
        .map(|c| (c.pointer.clone(), c.op))
        .collect();
    assert_eq!(
        ops,
        vec![
            ("/burst".into(), DiffOp::Added),
            ("/id".into(), DiffOp::Removed),
            ("/step".into(), DiffOp::Changed)
        ]
    );

    let rb = sys
        .client
        .syncpoint_rollback(&SyncPointWait {
            sync_point_id: sp.id.clone(),
            timeout_ms: 2000,
        })
        .await
        .unwrap();
    assert!(rb.verified, "{rb:?}");
    assert!(rb.mismatches.is_empty());
    let unacked: Vec<&AgentId> = rb
        .agents
        .iter()
        .filter(|r| !r.acked)
        .map(|r| &r.agent_id)
        .collect();
    assert_eq!(unacked, vec![&silent]);
    for (i, a) in agents.iter().enumerate() {
        let d = sys
            .client
            .state_get_at(&StateGet {
                agent_id: a.clone(),
                scope: s.clone(),
                revision: None,
            })
            .await
            .unwrap();
        assert_eq!(d.doc, json!({"step": 0, "id": i}));
        assert!(d.revision > revs[a]);
    }
    assert!(sys.client.syncpoint_diff(&sp.id).await.unwrap().unchanged);

    // The silent agent finally acknowledges: completing again succeeds.
    let late = serde_json::to_vec(&SyncAck {
        notice_id: sp.id.clone(),
        revision: revs[&silent],
    })
    .unwrap();
    sys.nats
        .publish(subject::sync_ack(&silent), late.into())
        .await
        .unwrap();
    let done = sys
        .client
        .syncpoint_complete(&SyncPointWait {
            sync_point_id: sp.id.clone(),
            timeout_ms: 3000,
        })
        .await
        .unwrap();
    assert_eq!(done.state, SyncPointState::Completed);

    let listed = sys
        .client
        .syncpoint_list(&SyncPointListRequest {
            scope: Some(s.clone()),
            state: None,
        })
        .await
        .unwrap();
    assert_eq!(listed.sync_points.len(), 1);
    assert_eq!(
        (
            listed.sync_points[0].participants,
            listed.sync_points[0].rollbacks
        ),
        (50, 1)
    );
    let got = sys.client.syncpoint_get(&sp.id).await.unwrap();
    assert_eq!(got.rollbacks.len(), 1);
    assert!(got.rollbacks[0].verified);

    // Bad input: unknown sync point, missing participant, no participants.
    let unknown = common::SyncPointId::new("nope").unwrap();
    assert_eq!(
        sys.client.syncpoint_get(&unknown).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    let missing = sys
        .client
        .syncpoint_initiate(&SyncPointInitiate {
            scope: s.clone(),
            agents: vec![agents[0].clone(), agent("ghost")],
            label: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound);
    assert_eq!(missing.details["missing"], json!(["ghost"]));
    let none = sys
        .client
        .syncpoint_initiate(&SyncPointInitiate {
            scope: s.clone(),
            agents: vec![],
            label: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(none.code, ErrorCode::BadRequest);
}

#[tokio::test]
async fn a_scope_that_enforces_its_schema_refuses_a_bad_document_on_write() {
    let sys = System::start().await;
    let schema =
        json!({"type": "object", "properties": {"budget": {"type": "number", "minimum": 0}}});
    let (strict, lax) = (scope("strict"), scope("lax"));
    let a = agent("w1");
    for (s, enforce) in [(&strict, true), (&lax, false)] {
        sys.client
            .scope_set(&ScopeConfig {
                enforce_schema: enforce,
                schema: Some(schema.clone()),
                ..config(s, ConflictPolicy::Reject)
            })
            .await
            .unwrap();
    }
    let refused = sys
        .client
        .state_put(&put(&strict, &a, 0, json!({"budget": -1})))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::ValidationFailed, "{refused:?}");
    assert!(
        refused.details["violations"][0]["pointer"] == "/budget",
        "{:?}",
        refused.details
    );
    let read = |s: &ScopeId| StateGet {
        agent_id: a.clone(),
        scope: s.clone(),
        revision: None,
    };
    let missing = sys.client.state_get_at(&read(&strict)).await.unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound, "nothing was stored");
    let ok = sys
        .client
        .state_put(&put(&strict, &a, 0, json!({"budget": 3})))
        .await
        .unwrap();
    assert_eq!(ok.doc, json!({"budget": 3}));
    // Without enforcement a put is stored as written; validate reports it.
    sys.client
        .state_put(&put(&lax, &a, 0, json!({"budget": -1})))
        .await
        .unwrap();
    assert_eq!(
        sys.client.state_get_at(&read(&lax)).await.unwrap().doc,
        json!({"budget": -1})
    );
    // Enforcement needs a schema.
    let e = sys
        .client
        .scope_set(&ScopeConfig {
            enforce_schema: true,
            ..config(&scope("none"), ConflictPolicy::Reject)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationFailed);
}
