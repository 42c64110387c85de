//! Agents kept apart by the server (`deploy/nats-auth.conf`, with entries from
//! `deploy/agent-user.sh`): an agent logged in as itself registers, runs a
//! flow's tasks and keeps its state through the synchronizer, while the server
//! refuses it another agent's assignments (core subject, durable consumer,
//! inbox), reports, registration and state writes, and JetStream back doors.
//! On any server the services refuse a request on an agent's own subject that
//! names another agent, and fencing keeps a report for another agent's lease
//! out. User/password login over TLS is exercised once, and once over mutual
//! TLS with the services and an agent running a flow; a login with a
//! credentials file (operator/JWT mode) once. `attacks`: replies aimed by an
//! agent at subjects it may not publish on.

mod attacks;
mod events;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::config::NatsConfig;
use common::msg::{
    AgentInfo, DeregisterAgent, Event, EventKind, FlowState, RegisterAgent, StateDelete,
    StateDeleted, StateDoc, StateGet, StateHistory, StateHistoryRequest, StatePut,
};
use common::{subject, AgentId, Client, ErrorCode};
use coordkit::{agent, demo};
use futures::StreamExt;
use serde_json::json;
use testkit::{
    eventually, start_service, wait_for_service, workspace_root, NatsServer, ServiceHandle, System,
};
use tokio::sync::mpsc;

use testkit::isolated::{isolated_server, login, password, OPERATOR, SERVICE};

/// The four services logged in as `coord-service` and answering, and an
/// operator's connection with a client over it.
async fn serve_isolated(server: &NatsServer) -> (Vec<ServiceHandle>, async_nats::Client, Client) {
    let services = testkit::SERVICES
        .iter()
        .map(|n| start_service(n, login(server, SERVICE)))
        .collect();
    let operator = common::nats::connect(&login(server, OPERATOR), "operator")
        .await
        .unwrap();
    for name in testkit::SERVICES {
        wait_for_service(&operator, name).await;
    }
    let ops = Client::new(operator.clone()).with_timeout(Duration::from_secs(10));
    (services, operator, ops)
}

/// How an agent connects: as the user named after it, with its own inboxes.
fn agent_login(server: &NatsServer, agent: &AgentId) -> NatsConfig {
    let mut cfg = login(server, (agent.as_str(), &password(agent.as_str())));
    cfg.nats_inbox_prefix = Some(agent::inbox_prefix(agent));
    cfg
}

/// A connection as `cfg` says that hands over every error the server sends it.
async fn watched(cfg: &NatsConfig) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(
        cfg.nats_user.clone().unwrap(),
        cfg.nats_password.clone().unwrap(),
    )
    .custom_inbox_prefix(cfg.nats_inbox_prefix.clone().unwrap())
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event {
                let _ = tx.send(e.to_string());
            }
        }
    })
    .connect(&cfg.nats_url)
    .await
    .expect("agent connects with its password");
    (client, rx)
}

fn registration(agent: &AgentId) -> RegisterAgent {
    RegisterAgent {
        agent_id: agent.clone(),
        capabilities: vec![],
        labels: Default::default(),
        capacity: [("cpu".to_string(), 1.0)].into(),
        // Long enough that no sweep declares it lost while the test runs.
        heartbeat_interval_ms: 600_000,
    }
}

fn put(agent: &AgentId, expected_revision: u64, doc: serde_json::Value) -> StatePut {
    StatePut {
        agent_id: agent.clone(),
        expected_revision,
        doc,
        scope: Default::default(),
        clock: None,
    }
}

/// The revision of `agent`'s record in the agents bucket: any registration,
/// deregistration or booking moves it.
async fn agent_revision(nats: &async_nats::Client, agent: &AgentId) -> u64 {
    let agents = async_nats::jetstream::new(nats.clone())
        .get_key_value(common::nats::KV_AGENTS)
        .await
        .unwrap();
    agents
        .entry(agent.as_str())
        .await
        .unwrap()
        .expect("the agent is registered")
        .revision
}

/// Requests on `me`'s own subjects whose bodies name `other`: every one is
/// refused by the service with `forbidden`.
async fn acting_for_another_is_forbidden(
    client: &Client,
    me: &AgentId,
    other: &AgentId,
    other_revision: u64,
) {
    let results: Vec<(&str, Result<(), common::Error>)> = vec![
        (
            "put",
            client
                .request::<_, StateDoc>(
                    &subject::agent_state_put(me),
                    &put(other, other_revision, json!({"owner": "intruder"})),
                )
                .await
                .map(drop),
        ),
        (
            "delete",
            client
                .request::<_, StateDeleted>(
                    &subject::agent_state_delete(me),
                    &StateDelete {
                        agent_id: other.clone(),
                        scope: Default::default(),
                        expected_revision: None,
                    },
                )
                .await
                .map(drop),
        ),
        (
            "get",
            client
                .request::<_, StateDoc>(
                    &subject::agent_state_get(me),
                    &StateGet {
                        agent_id: other.clone(),
                        scope: Default::default(),
                        revision: None,
                    },
                )
                .await
                .map(drop),
        ),
        (
            "history",
            client
                .request::<_, StateHistory>(
                    &subject::agent_state_history(me),
                    &StateHistoryRequest {
                        agent_id: other.clone(),
                        scope: Default::default(),
                    },
                )
                .await
                .map(drop),
        ),
        (
            "register",
            client
                .request::<_, AgentInfo>(&subject::agent_register(me), &registration(other))
                .await
                .map(drop),
        ),
        (
            "deregister",
            client
                .request::<_, AgentInfo>(
                    &subject::agent_deregister(me),
                    &DeregisterAgent {
                        agent_id: other.clone(),
                    },
                )
                .await
                .map(drop),
        ),
    ];
    for (what, result) in results {
        let err = result.expect_err(what);
        assert_eq!(err.code, ErrorCode::Forbidden, "{what}: {err}");
    }
}

/// Waits for the server's permissions violation naming `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, what: &str, subject: &str) {
    let quoted = format!("\"{subject}\"");
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(e) = errors.recv().await {
            if e.contains("Permissions Violation") && e.contains(&quoted) {
                return Some(e);
            }
        }
        None
    })
    .await;
    assert!(
        matches!(seen, Ok(Some(_))),
        "{what}: the server did not refuse {subject}"
    );
}

#[tokio::test]
async fn an_agent_runs_as_itself_and_cannot_touch_another_agents_work() {
    common::telemetry::init_for_tests();
    let (a, b) = (
        AgentId::new("iso-a").unwrap(),
        AgentId::new("iso-b").unwrap(),
    );
    let server = isolated_server(&[a.as_str(), b.as_str()]);
    let (services, operator, ops) = serve_isolated(&server).await;

    // A, through the agent runtime on its own login, runs a whole flow.
    let a_nats = common::nats::connect(&agent_login(&server, &a), "iso-a")
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::spawn(demo::run_echo_agent(
        a_nats.clone(),
        a.clone(),
        Duration::from_millis(10),
        async {
            let _ = stopped.await;
        },
    ));
    let created = ops.create_flow(&demo::demo_flow().unwrap()).await.unwrap();
    let status = eventually(Duration::from_secs(30), "flow done", || async {
        let s = ops.flow_status(&created.flow_id).await.ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");
    assert!(status.tasks.iter().all(|t| t.agent_id.as_ref() == Some(&a)));

    // A keeps its own state through the synchronizer.
    let a_client = Client::new(a_nats.clone()).with_timeout(Duration::from_secs(10));
    let mine = a_client
        .state_put(&put(&a, 0, json!({"step": 1})))
        .await
        .unwrap();
    assert_eq!(a_client.state_get(&a).await.unwrap().doc, mine.doc);

    // B, registered and with its state, written by B.
    let b_client = Client::new(
        common::nats::connect(&agent_login(&server, &b), "iso-b")
            .await
            .unwrap(),
    );
    b_client.register_agent(&registration(&b)).await.unwrap();
    let b_doc = b_client
        .state_put(&put(&b, 0, json!({"owner": "b"})))
        .await
        .unwrap();
    let b_registered = agent_revision(&operator, &b).await;

    // Everything A might try against B, each refused by the server.
    let (spy, mut errors) = watched(&agent_login(&server, &a)).await;
    let b_inbox = format!("{}.>", agent::inbox_prefix(&b));
    for (what, subj) in [
        ("B's assignments", subject::assign(&b)),
        ("B's inbox, where its pulled assignments arrive", b_inbox),
        ("every inbox", "_INBOX.>".to_owned()),
        ("B's cancel notices", subject::cancel(&b)),
        ("B's sync notices", subject::sync_notice(&b)),
    ] {
        let _sub = spy.subscribe(subj.clone()).await.unwrap();
        refused(&mut errors, what, &subj).await;
    }
    let durable = agent::consumer_name(&b);
    let report = json!({
        "flow_id": created.flow_id, "task_id": "a", "attempt": 1, "agent_id": b,
        "type": "completed", "output": {"forged": true}
    })
    .to_string();
    let forged_put =
        serde_json::to_string(&put(&b, b_doc.revision, json!({"owner": "a"}))).unwrap();
    let naming_b = json!({"agent_id": b}).to_string();
    let forged_registration = serde_json::to_string(&registration(&b)).unwrap();
    for (what, subj, body) in [
        (
            "pulling from B's durable",
            format!("$JS.API.CONSUMER.MSG.NEXT.COORD_ASSIGN.{durable}"),
            json!({"batch": 1}).to_string(),
        ),
        (
            "reading B's durable",
            format!("$JS.API.CONSUMER.INFO.COORD_ASSIGN.{durable}"),
            String::new(),
        ),
        (
            "a consumer of its own on B's subject",
            format!(
                "$JS.API.CONSUMER.CREATE.COORD_ASSIGN.{}.{}",
                agent::consumer_name(&a),
                subject::assign(&b)
            ),
            String::new(),
        ),
        (
            "an ephemeral consumer",
            "$JS.API.CONSUMER.CREATE.COORD_ASSIGN".to_owned(),
            String::new(),
        ),
        (
            "reading the stream directly",
            "$JS.API.DIRECT.GET.COORD_ASSIGN".to_owned(),
            String::new(),
        ),
        (
            "acknowledging for B",
            format!("$JS.ACK.COORD_ASSIGN.{durable}.1.1.1.0.0"),
            String::new(),
        ),
        ("a report on B's subject", subject::report(&b), report),
        ("B's heartbeat", subject::heartbeat(&b), String::new()),
        (
            "an assignment to itself",
            subject::assign(&a),
            String::new(),
        ),
        (
            "the state bucket directly",
            "$JS.API.STREAM.INFO.KV_coord_state".to_owned(),
            String::new(),
        ),
        // Registration and state, on B's own subjects and on the shared ones
        // (which name the agent only in the JSON).
        (
            "B's state put",
            subject::agent_state_put(&b),
            forged_put.clone(),
        ),
        (
            "a shared state put",
            subject::STATE_PUT.to_owned(),
            forged_put,
        ),
        (
            "B's state delete",
            subject::agent_state_delete(&b),
            naming_b.clone(),
        ),
        (
            "a shared state delete",
            subject::STATE_DELETE.to_owned(),
            naming_b.clone(),
        ),
        (
            "B's own state read",
            subject::agent_state_get(&b),
            naming_b.clone(),
        ),
        (
            "registering as B",
            subject::agent_register(&b),
            forged_registration.clone(),
        ),
        (
            "a shared registration",
            subject::AGENT_REGISTER.to_owned(),
            forged_registration,
        ),
        (
            "deregistering B",
            subject::agent_deregister(&b),
            naming_b.clone(),
        ),
        (
            "a shared deregistration",
            subject::AGENT_DEREGISTER.to_owned(),
            naming_b,
        ),
    ] {
        spy.publish_with_reply(subj.clone(), spy.new_inbox(), body.into())
            .await
            .unwrap();
        refused(&mut errors, what, &subj).await;
    }

    // On its own subjects the service refuses A a body naming B.
    acting_for_another_is_forbidden(&a_client, &a, &b, b_doc.revision).await;

    // B's registration and state are as B left them.
    assert_eq!(agent_revision(&operator, &b).await, b_registered);
    let b_now = ops.state_get(&b).await.unwrap();
    assert_eq!(
        (b_now.revision, &b_now.doc),
        (b_doc.revision, &json!({"owner": "b"}))
    );

    // Refusals close nothing: A's own requests still work, and it may read
    // B's state through the shared, read-only subject.
    a_client.register_agent(&registration(&a)).await.unwrap();
    let again = a_client
        .state_put(&put(&a, mine.revision, json!({"step": 2})))
        .await
        .unwrap();
    assert!(again.revision > mine.revision);
    let history = a_client
        .state_history(&StateHistoryRequest {
            agent_id: a.clone(),
            scope: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(history.entries.len(), 2);
    let peer: StateDoc = a_client
        .request(
            subject::STATE_GET,
            &StateGet {
                agent_id: b.clone(),
                scope: Default::default(),
                revision: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(peer.doc, json!({"owner": "b"}));
    let _ = stop.send(());
    runtime.await.unwrap().unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}

/// The Python example agent, written from the protocol page, logs in as itself
/// on the isolating server with its own inbox prefix (the default it derives
/// from its id) and runs a flow's tasks, storing its state after each one on
/// its own subjects.
/// An agent killed mid-task leaves its delivery unacknowledged; started
/// again under the same id it makes its consumer afresh (deleting the old
/// one, which its permissions allow for its own consumer only) and the task
/// completes, on a server that keeps agents apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_task_restarts_and_finishes_it_on_an_isolating_server() {
    let me = AgentId::new("iso-r").unwrap();
    let server = isolated_server(&[me.as_str()]);
    let (services, _, ops) = serve_isolated(&server).await;
    let start = |finish: bool| {
        let (cfg, me) = (agent_login(&server, &me), me.clone());
        testkit::Isolated::spawn(async move {
            let nats = common::nats::connect(&cfg, me.as_str()).await.unwrap();
            let opts = agent::AgentOptions::new(me).capacity("cpu", 1.0);
            let handler = move |_a: common::msg::Assignment| async move {
                if !finish {
                    std::future::pending::<()>().await;
                }
                Ok(json!({"done": true}))
            };
            if let Err(e) = agent::run(nats, opts, handler, std::future::pending::<()>()).await {
                eprintln!("agent stopped: {e}");
            }
        })
    };
    let first = start(false);
    let mut spec = common::msg::FlowSpec::new("restart", vec![demo_task("only")]);
    spec.id = Some(common::FlowId::new("restart").unwrap());
    let created = ops.create_flow(&spec).await.unwrap();
    eventually(Duration::from_secs(20), "the task running", || async {
        let s = ops.flow_status(&created.flow_id).await.ok()?;
        (s.tasks[0].state == common::msg::TaskState::Running).then_some(())
    })
    .await;
    tokio::task::block_in_place(|| first.kill());

    let second = start(true);
    let status = eventually(Duration::from_secs(20), "flow done", || async {
        let s = ops.flow_status(&created.flow_id).await.ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");
    assert_eq!(status.tasks[0].attempt, 1, "the same attempt, redelivered");
    tokio::task::block_in_place(|| second.kill());
    for s in services {
        s.stop().await.unwrap();
    }
}

fn demo_task(id: &str) -> common::msg::TaskSpec {
    let mut t = common::msg::TaskSpec::new(common::TaskId::new(id).unwrap());
    t.kind = "work".into();
    t.requirements.resources.insert("cpu".into(), 1.0);
    t
}

#[tokio::test]
async fn the_python_agent_runs_as_itself_on_an_isolating_server() {
    common::telemetry::init_for_tests();
    let me = AgentId::new("iso-py").unwrap();
    let server = isolated_server(&[me.as_str()]);
    let (services, _, ops) = serve_isolated(&server).await;
    let python = workspace_root().join(".local/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `source scripts/setup.sh` (it installs nats-py)",
        python.display()
    );
    let mut agent = tokio::process::Command::new(python)
        .arg(workspace_root().join("examples/python/agent.py"))
        .args(["--agent-id", me.as_str(), "--capability", "python"])
        .env("NATS_URL", server.url())
        .env("NATS_USER", me.as_str())
        .env("NATS_PASSWORD", password(me.as_str()))
        .env_remove("NATS_INBOX_PREFIX")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut spec = demo::demo_flow().unwrap();
    for t in &mut spec.tasks {
        t.requirements.capabilities = vec!["python".into()];
    }
    let tasks = spec.tasks.len();
    let created = ops.create_flow(&spec).await.unwrap();
    let done = eventually(Duration::from_secs(60), "the flow to finish", || async {
        let s = ops.flow_status(&created.flow_id).await.ok()?;
        s.state.is_terminal().then_some(s)
    })
    .await;
    if done.state != FlowState::Succeeded {
        let _ = agent.start_kill();
        let out = agent.wait_with_output().await.unwrap();
        panic!(
            "flow ended {:?}\nagent stdout:\n{}\nagent stderr:\n{}",
            done.state,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(done.tasks.iter().all(|t| t.agent_id.as_ref() == Some(&me)));
    eventually(
        Duration::from_secs(10),
        "its state after every task",
        || async {
            let doc = ops.state_get(&me).await.ok()?;
            (doc.doc["tasks_done"] == tasks).then_some(())
        },
    )
    .await;
    // It leaves on SIGTERM with only the subjects the server allows it:
    // drain, its consumer's info, leave.
    let pid = agent.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(5), agent.wait_with_output())
        .await
        .expect("the agent exits within 5 s of SIGTERM")
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("left (left)"), "{log}");
    assert!(
        !log.to_lowercase().contains("permissions violation"),
        "{log}"
    );
    for s in services {
        s.stop().await.unwrap();
    }
}

/// On a server that lets anyone publish anywhere, the services still take the
/// agent from the subject of its own requests: a body naming another agent is
/// refused with `forbidden`, the other agent's registration and state stay as
/// they were, and the agent's requests for itself go through.
#[tokio::test]
async fn services_refuse_a_request_for_another_agent_on_an_open_server() {
    let sys = System::start().await;
    let (a, b) = (
        AgentId::new("open-a").unwrap(),
        AgentId::new("open-b").unwrap(),
    );
    sys.client.register_agent(&registration(&b)).await.unwrap();
    let b_doc = sys
        .client
        .state_put(&put(&b, 0, json!({"owner": "b"})))
        .await
        .unwrap();
    let b_registered = agent_revision(&sys.nats, &b).await;
    sys.client.register_agent(&registration(&a)).await.unwrap();

    acting_for_another_is_forbidden(&sys.client, &a, &b, b_doc.revision).await;

    assert_eq!(agent_revision(&sys.nats, &b).await, b_registered);
    let b_now = sys.client.state_get(&b).await.unwrap();
    assert_eq!(
        (b_now.revision, &b_now.doc),
        (b_doc.revision, &json!({"owner": "b"}))
    );
    let mine = sys
        .client
        .state_put(&put(&a, 0, json!({"owner": "a"})))
        .await
        .unwrap();
    let deleted = sys
        .client
        .state_delete(&StateDelete {
            agent_id: a.clone(),
            scope: Default::default(),
            expected_revision: Some(mine.revision),
        })
        .await
        .unwrap();
    assert!(deleted.deleted);
    let left = sys.client.deregister_agent(&a).await.unwrap();
    assert_eq!(left.status, common::msg::AgentStatus::Draining);
}

/// On a server that lets anyone publish anywhere, a report for an attempt
/// another agent holds is rejected whichever way it names its sender, and the
/// holder's own report still decides the task.
#[tokio::test]
async fn fencing_rejects_a_report_for_another_agents_lease_on_an_open_server() {
    let sys = System::start().await;
    let mut rejected = sys
        .nats
        .subscribe(subject::event::REPORT_REJECTED)
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let (holder, intruder) = (
        AgentId::new("holder").unwrap(),
        AgentId::new("intruder").unwrap(),
    );
    let (release, released) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut opts = demo::demo_agent_options().unwrap();
    opts.agent_id = holder.clone();
    let runtime = tokio::spawn(agent::run(
        sys.nats.clone(),
        opts,
        move |task| {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                Ok(json!({"by": "holder", "task": task.task_id}))
            }
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut spec = demo::demo_flow().unwrap();
    spec.tasks.truncate(1);
    let created = sys.client.create_flow(&spec).await.unwrap();
    let running = eventually(Duration::from_secs(30), "task a running", || async {
        let s = sys.client.flow_status(&created.flow_id).await.ok()?;
        s.tasks
            .iter()
            .any(|t| t.state == common::msg::TaskState::Running)
            .then_some(s)
    })
    .await;
    let attempt = running.tasks[0].attempt;

    let js = async_nats::jetstream::new(sys.nats.clone());
    for (sender, named, why) in [
        (&intruder, &intruder, "does not hold"),
        (&intruder, &holder, "another agent's subject"),
    ] {
        let body = json!({
            "flow_id": created.flow_id, "task_id": "a", "attempt": attempt, "agent_id": named,
            "type": "completed", "output": {"by": "intruder"}
        });
        js.publish(subject::report(sender), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(10), rejected.next())
            .await
            .expect("a rejection event")
            .unwrap();
        let event: Event = serde_json::from_slice(&msg.payload).unwrap();
        assert!(
            matches!(event.kind, EventKind::ReportRejected { ref reason, .. } if reason.contains(why)),
            "{why}: {event:?}"
        );
    }
    let still = sys.client.flow_status(&created.flow_id).await.unwrap();
    assert_eq!(still.state, FlowState::Running, "{still:?}");

    release.send(true).unwrap();
    let done = eventually(Duration::from_secs(30), "flow done", || async {
        let s = sys.client.flow_status(&created.flow_id).await.ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert_eq!(done.tasks[0].output["by"], "holder");
    let _ = stop.send(());
    runtime.await.unwrap().unwrap();
}

/// Files for a server certificate for 127.0.0.1 and a client certificate,
/// both signed by a CA made here.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl makes the test certificates");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=coordkit test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=coordkit test client",
        ],
    ]
    .concat());
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "1",
        "-extfile",
        "client.ext",
    ]);
}

/// The connection options of `NatsConfig` against a server that wants TLS and
/// a password: a service logs in and answers; a wrong password or an unknown
/// CA gets nowhere.
#[tokio::test]
async fn services_log_in_with_a_password_over_tls() {
    common::telemetry::init_for_tests();
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).display().to_string();
    let server = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\nauthorization {{ user: svc, password: \"s3cret\" }}\n",
        p("server.pem"),
        p("server.key")
    ));
    let mut cfg = server.config();
    cfg.nats_user = Some("svc".into());
    cfg.nats_password = Some("s3cret".into());
    cfg.nats_tls_ca = Some(certs.path().join("ca.pem"));
    cfg.nats_tls_required = true;

    let allocator = start_service("allocator", cfg.clone());
    let nats = common::nats::connect_within(&cfg, "tls-test", Duration::from_secs(10))
        .await
        .unwrap();
    wait_for_service(&nats, "allocator").await;
    let info = Client::new(nats)
        .register_agent(&RegisterAgent {
            agent_id: AgentId::new("tls-agent").unwrap(),
            capabilities: vec![],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1.0)].into(),
            heartbeat_interval_ms: 5_000,
        })
        .await
        .unwrap();
    assert_eq!(info.agent_id.as_str(), "tls-agent");

    let patience = Duration::from_millis(1_500);
    let mut wrong = cfg.clone();
    wrong.nats_password = Some("guess".into());
    assert!(
        common::nats::connect_within(&wrong, "wrong-password", patience)
            .await
            .is_err()
    );
    let mut untrusted = cfg.clone();
    untrusted.nats_tls_ca = None;
    assert!(
        common::nats::connect_within(&untrusted, "unknown-ca", patience)
            .await
            .is_err()
    );
    allocator.stop().await.unwrap();
}

/// Mutual TLS and a password, set through the documented flags (each also
/// read from its `NATS_*` variable): the services and an agent log in and run
/// a flow; without the client certificate, or with a wrong password, the
/// server refuses the connection.
#[tokio::test]
async fn services_and_an_agent_run_a_flow_over_mutual_tls_with_a_password() {
    common::telemetry::init_for_tests();
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).display().to_string();
    let server = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}\nauthorization {{ user: svc, password: \"s3cret\" }}\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    ));
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        nats: NatsConfig,
    }
    let flags = [
        "coord",
        "--nats-url",
        server.url(),
        "--nats-user",
        "svc",
        "--nats-password",
        "s3cret",
        "--nats-tls-ca",
        &p("ca.pem"),
        "--nats-tls-cert",
        &p("client.pem"),
        "--nats-tls-key",
        &p("client.key"),
        "--nats-tls-required",
    ];
    let cfg = <Flags as clap::Parser>::try_parse_from(flags).unwrap().nats;

    let services: Vec<_> = ["orchestrator", "allocator"]
        .into_iter()
        .map(|n| start_service(n, cfg.clone()))
        .collect();
    let nats = common::nats::connect_within(&cfg, "mtls-test", Duration::from_secs(10))
        .await
        .unwrap();
    for name in ["orchestrator", "allocator"] {
        wait_for_service(&nats, name).await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(demo::run_demo_agent(
        common::nats::connect_within(&cfg, "mtls-agent", Duration::from_secs(10))
            .await
            .unwrap(),
        Duration::from_millis(10),
        async {
            let _ = stopped.await;
        },
    ));
    let client = Client::new(nats).with_timeout(Duration::from_secs(10));
    let created = client
        .create_flow(&demo::demo_flow().unwrap())
        .await
        .unwrap();
    let status = eventually(Duration::from_secs(30), "flow done", || async {
        let s = client.flow_status(&created.flow_id).await.ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");

    let patience = Duration::from_millis(1_500);
    let mut no_cert = cfg.clone();
    no_cert.nats_tls_cert = None;
    no_cert.nats_tls_key = None;
    assert!(
        common::nats::connect_within(&no_cert, "no-client-cert", patience)
            .await
            .is_err()
    );
    let mut wrong = cfg.clone();
    wrong.nats_password = Some("guess".into());
    assert!(
        common::nats::connect_within(&wrong, "wrong-password", patience)
            .await
            .is_err()
    );
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}

/// A NATS JWT: `nats` claims about `subject`, signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": subject,
        "iat": common::now_ms() / 1000,
        "iss": issuer.public_key(),
        "name": subject,
        "sub": subject,
        "nats": nats,
    });
    let claims = b64.encode(serde_json::to_vec(&claims).unwrap());
    let signed = format!("{header}.{claims}");
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64.encode(signature))
}

/// A server in operator (JWT) mode, its operator, system account and one
/// account with JetStream made here, and a credentials file (user JWT and
/// nkey seed) for a user of that account: a service logs in with the file
/// alone; without it, or with a user of an account the server does not
/// know, the server refuses the connection.
#[tokio::test]
async fn services_log_in_with_a_credentials_file() {
    common::telemetry::init_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        json!({ "type": "operator", "version": 2, "system_account": system.public_key() }),
    );
    let limits = |jetstream: bool| {
        let mut l = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        if jetstream {
            for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
                l[k] = json!(-1);
            }
        }
        json!({ "limits": l, "default_permissions": { "pub": {}, "sub": {} }, "type": "account", "version": 2 })
    };
    let system_jwt = nats_jwt(&operator, &system.public_key(), limits(false));
    let account_jwt = nats_jwt(&operator, &account.public_key(), limits(true));
    let operator_file = dir.path().join("operator.jwt");
    std::fs::write(&operator_file, &operator_jwt).unwrap();
    let server = NatsServer::start_with_config(&format!(
        "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{system_jwt}\"\n  {}: \"{account_jwt}\"\n}}\n",
        operator_file.display(),
        system.public_key(),
        system.public_key(),
        account.public_key(),
    ));
    let creds = |signer: &nkeys::KeyPair, name: &str| {
        let user = nkeys::KeyPair::new_user();
        let jwt = nats_jwt(
            signer,
            &user.public_key(),
            json!({ "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2 }),
        );
        let path = dir.path().join(format!("{name}.creds"));
        std::fs::write(
            &path,
            format!(
                "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                user.seed().unwrap()
            ),
        )
        .unwrap();
        path
    };
    let mut cfg = server.config();
    cfg.nats_creds = Some(creds(&account, "svc"));

    let allocator = start_service("allocator", cfg.clone());
    let nats = common::nats::connect_within(&cfg, "creds-test", Duration::from_secs(10))
        .await
        .unwrap();
    wait_for_service(&nats, "allocator").await;
    let info = Client::new(nats)
        .with_timeout(Duration::from_secs(10))
        .register_agent(&RegisterAgent {
            agent_id: AgentId::new("creds-agent").unwrap(),
            capabilities: vec![],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1.0)].into(),
            heartbeat_interval_ms: 5_000,
        })
        .await
        .unwrap();
    assert_eq!(info.agent_id.as_str(), "creds-agent");

    let patience = Duration::from_millis(1_500);
    let mut none = cfg.clone();
    none.nats_creds = None;
    assert!(common::nats::connect_within(&none, "no-creds", patience)
        .await
        .is_err());
    let mut stranger = cfg.clone();
    stranger.nats_creds = Some(creds(&nkeys::KeyPair::new_account(), "stranger"));
    assert!(
        common::nats::connect_within(&stranger, "stranger", patience)
            .await
            .is_err()
    );
    allocator.stop().await.unwrap();
}
