//! Agents kept apart by the server (`deploy/nats-auth.conf`, with entries from
//! `deploy/agent-user.sh`), as they are meant to work: an agent killed
//! mid-task restarts and finishes it, and the Python example agent runs as
//! itself. User/password login over TLS is exercised once, and once over
//! mutual TLS with the services and an agent running a flow; a login with a
//! credentials file (operator/JWT mode) once. What a malicious agent tries is
//! in the `attacks` test target.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::config::NatsConfig;
use common::msg::{FlowState, RegisterAgent};
use common::{AgentId, Client};
use coordkit::{agent, demo};
use serde_json::json;
use testkit::isolated::{agent_login, isolated_server, password, serve_isolated};
use testkit::{eventually, start_service, wait_for_service, workspace_root, NatsServer};

/// The Python example agent, written from the protocol page, logs in as itself
/// on the isolating server with its own inbox prefix (the default it derives
/// from its id) and runs a flow's tasks, storing its state after each one on
/// its own subjects.
/// An agent killed mid-task, started again under the same id, hands back
/// what its dead run held (its leave, on its own subject) and the task
/// completes as a new attempt, on a server that keeps agents apart.
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
    assert_eq!(
        status.tasks[0].attempt, 2,
        "handed back by the new run, run again at once"
    );
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
    let mut agent = tokio::process::Command::new(python);
    testkit::tie_to_parent(agent.as_std_mut());
    let mut agent = agent
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
    // Marked lost with no event, as a partition may leave it: answered
    // `lost` on a heartbeat (through its account's import), it registers
    // again.
    let mut registered = ops
        .nats()
        .subscribe(common::subject::event::AGENT_REGISTERED)
        .await
        .unwrap();
    ops.nats().flush().await.unwrap();
    crate::blip::mark_lost(ops.nats(), me.as_str()).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        futures::StreamExt::next(&mut registered),
    )
    .await
    .expect("the Python agent registers again once told it is lost")
    .unwrap();
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
