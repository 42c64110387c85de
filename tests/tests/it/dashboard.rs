//! The dashboard in headless Chromium: a running flow's tasks changing
//! state (the rendered page), the detail views reached link by link, and a
//! user clicking through flow → task → agent and acting (`cdp`), with the
//! actions refused without the token; the charts' axes and an anomaly's link.

use std::sync::Arc;
use std::time::Duration;

use common::msg::{AgentStatus, FlowState, TaskState};
use common::AgentId;
use coordkit::agent::{self, AgentOptions, TaskFailure};
use serde_json::json;
use testkit::{eventually, ServiceHandle, System};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Semaphore};

use crate::cdp::{Browser, HEADLESS};
use crate::monitor::{flow, run_flow, wait_registered, work};

/// An agent (2 cpus, 2 at once) whose tasks wait for the test: `ok` answers
/// 42 at once, `bad` fails for good, any other reports 40 % "indexing" and
/// then holds until [`HeldAgent::release`].
struct HeldAgent {
    go: Arc<Semaphore>,
    stop: oneshot::Sender<()>,
    run: tokio::task::JoinHandle<Result<(), common::Error>>,
}

impl HeldAgent {
    async fn start(sys: &System, id: &str) -> HeldAgent {
        let go = Arc::new(Semaphore::new(0));
        let mut opts = AgentOptions::new(AgentId::new(id).unwrap()).capacity("cpu", 2.0);
        opts.heartbeat_interval = Duration::from_millis(300);
        opts.concurrency = 2;
        let (stop, stopped) = oneshot::channel::<()>();
        let handler = {
            let go = go.clone();
            move |a: common::msg::Assignment| {
                let go = go.clone();
                async move {
                    match a.task_id.as_str() {
                        "ok" => Ok(json!({"answer": 42})),
                        "bad" => Err(TaskFailure {
                            error: "disk full on /scratch".into(),
                            retryable: false,
                        }),
                        _ => {
                            agent::progress(Some(0.4), Some("indexing".into()))
                                .await
                                .map_err(|e| TaskFailure::from(e.to_string()))?;
                            let _ = go.acquire().await.map(|p| p.forget());
                            Ok(json!({"ok": true}))
                        }
                    }
                }
            }
        };
        let run = tokio::spawn(agent::run(sys.nats.clone(), opts, handler, async {
            let _ = stopped.await;
        }));
        wait_registered(&sys.client, id).await;
        HeldAgent { go, stop, run }
    }

    /// Lets `n` held tasks finish.
    fn release(&self, n: usize) {
        self.go.add_permits(n);
    }

    async fn stop(self) {
        self.go.add_permits(Semaphore::MAX_PERMITS / 2);
        let _ = self.stop.send(());
        self.run.await.unwrap().unwrap();
    }
}

/// Chromium, if installed (`scripts/test.sh` installs it): `CHROMIUM_BIN`, or on `PATH`.
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM_BIN") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
}

/// [`chromium`], or a line saying the test skipped.
fn chromium_or_skip() -> Option<std::path::PathBuf> {
    let found = chromium();
    if found.is_none() {
        println!(
            "SKIPPED: chromium is not installed and could not be installed here \
             (scripts/test.sh installs it with apt-get; or set CHROMIUM_BIN)"
        );
    }
    found
}

/// The page as Chromium renders it after its scripts ran, and what it logged.
async fn render(browser: &std::path::Path, url: &str) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(browser)
            .args(HEADLESS)
            .args([
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes")
    .expect("chromium runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn task_state<'a>(dom: &'a str, task: &str) -> Option<&'a str> {
    let at = dom.find(&format!("data-task=\"{task}\""))?;
    let rest = &dom[at..];
    let s = rest.find("data-state=\"")? + "data-state=\"".len();
    rest[s..].split('"').next()
}

#[tokio::test]
async fn dashboard_shows_a_running_flows_tasks_changing_state_in_headless_chromium() {
    let Some(browser) = chromium_or_skip() else {
        return;
    };
    let sys = System::start().await;
    // Every task runs until the test lets it go, so `a` is still running
    // however long the page takes to render.
    let agent = HeldAgent::start(&sys, "dash-w1").await;
    let created = sys
        .client
        .create_flow(&flow("dash-f1", vec![work("a", &[]), work("b", &["a"])]))
        .await
        .unwrap();
    let fid = created.flow_id.clone();
    eventually(Duration::from_secs(20), "task a running at 40%", || async {
        let s = sys.client.flow_status(&fid).await.ok()?;
        let a = s.tasks.iter().find(|t| t.task_id.as_str() == "a")?;
        (a.state == common::msg::TaskState::Running && a.progress == Some(0.4)).then_some(())
    })
    .await;
    let addr = sys.client.health_report().await.unwrap().http_addr.unwrap();
    let url = format!("http://{addr}/");

    let (dom, log) = render(&browser, &url).await;
    assert!(
        dom.contains("data-loaded=\"true\""),
        "page did not load:\n{dom}\n{log}"
    );
    assert!(dom.contains("data-flow=\"dash-f1\""), "{dom}");
    assert_eq!(task_state(&dom, "a"), Some("running"), "{dom}");
    assert!(
        dom.contains("data-progress=\"0.4\"") && dom.contains("a: running 40%"),
        "a's progress shown: {dom}"
    );
    assert!(dom.contains("indexing"), "its message in the title: {dom}");
    assert_eq!(task_state(&dom, "b"), Some("blocked"), "{dom}");
    assert!(dom.contains("class=\"verdict healthy\""), "{dom}");
    assert!(dom.contains("<path"), "charts drawn: {dom}");
    assert!(
        dom.contains("<svg class=\"dag\"") && dom.matches("class=\"edge\"").count() == 1,
        "the flow drawn as a graph with its one edge a → b: {dom}"
    );
    assert!(
        !log.contains("Uncaught") && !log.contains("refresh failed"),
        "console errors:\n{log}"
    );

    // Let every task finish: `a`, then `b`.
    agent.release(2);
    eventually(Duration::from_secs(30), "flow finished", || async {
        let s = sys.client.flow_status(&fid).await.ok()?;
        s.state.is_terminal().then_some(())
    })
    .await;
    let (dom, log) = render(&browser, &url).await;
    assert_eq!(task_state(&dom, "a"), Some("succeeded"), "{dom}");
    assert_eq!(task_state(&dom, "b"), Some("succeeded"), "{dom}");
    assert!(dom.contains("class=\"agent\""), "{dom}");
    assert!(!log.contains("Uncaught"), "console errors:\n{log}");
    agent.stop().await;
}

/// Where the detail test leaves its screenshots: `DASHBOARD_SCREENSHOTS`
/// (e.g. `docs/img` to refresh the documentation's), or nowhere.
async fn screenshot(browser: &std::path::Path, url: &str, name: &str) {
    let Some(dir) = std::env::var_os("DASHBOARD_SCREENSHOTS") else {
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    // The page is served by this test's own runtime: wait without blocking it.
    let status = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(browser)
            .args(HEADLESS)
            .arg("--hide-scrollbars")
            .args(["--window-size=1200,1300", "--virtual-time-budget=3000"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!(
                "--screenshot={}",
                std::path::Path::new(&dir).join(name).display()
            ))
            .arg(url)
            .kill_on_drop(true)
            .status(),
    )
    .await
    .expect("the screenshot is taken within 90 s")
    .unwrap();
    assert!(status.success(), "screenshot {name}");
}

/// The dashboard's detail views, each reached by the link the view before it
/// shows: the failed flows (a filter), one flow (each task's state, attempt,
/// agent, input, output, error), and the agent a task ran on (status,
/// heartbeat age, utilisation, the task it runs now, linked to its flow).
#[tokio::test]
async fn dashboard_leads_from_a_flow_to_its_tasks_and_their_agent_in_headless_chromium() {
    let Some(browser) = chromium_or_skip() else {
        return;
    };
    let sys = System::start().await;
    let agent = HeldAgent::start(&sys, "dash-w2").await;
    let mut ok = work("ok", &[]);
    ok.input = json!({"question": "six times seven"});
    let failing = flow("dash-failing", vec![ok, work("bad", &["ok"])]);
    let failing = sys.client.create_flow(&failing).await.unwrap().flow_id;
    let held = flow("dash-held", vec![work("hold", &[])]);
    let held = sys.client.create_flow(&held).await.unwrap().flow_id;
    eventually(
        Duration::from_secs(30),
        "one flow failed, one running",
        || async {
            let f = sys.client.flow_status(&failing).await.ok()?;
            let h = sys.client.flow_status(&held).await.ok()?;
            (f.state == FlowState::Failed && h.tasks[0].state == TaskState::Running).then_some(())
        },
    )
    .await;
    let addr = sys.client.health_report().await.unwrap().http_addr.unwrap();
    let base = format!("http://{addr}/");

    // The overview, filtered to failed flows, links to the failed one only.
    let (dom, log) = render(&browser, &format!("{base}#/?state=failed")).await;
    assert!(dom.contains("data-loaded=\"true\""), "{dom}\n{log}");
    assert!(dom.contains("data-flow=\"dash-failing\""), "{dom}");
    assert!(
        !dom.contains("data-flow=\"dash-held\""),
        "filtered out: {dom}"
    );
    assert!(dom.contains("1–1 of 1"), "the page says how many: {dom}");
    let to_flow = "href=\"#/flow/dash-failing\"";
    assert!(dom.contains(to_flow), "{dom}");

    // The flow: each task with its attempt, agent, input, output and error.
    let (dom, log) = render(&browser, &format!("{base}#/flow/dash-failing")).await;
    assert!(dom.contains("data-view=\"flow\""), "{dom}\n{log}");
    assert!(dom.contains("data-loaded=\"true\""), "{dom}\n{log}");
    let row = |task: &str| {
        let at = dom
            .find(&format!("id=\"task-{task}\""))
            .unwrap_or_else(|| panic!("no row for {task}: {dom}"));
        dom[at..dom[at..].find("</tr>").map_or(dom.len(), |e| at + e)].to_owned()
    };
    let bad = row("bad");
    assert!(bad.contains("data-state=\"failed\""), "{bad}");
    assert!(
        bad.contains("disk full on /scratch"),
        "the error message: {bad}"
    );
    let ok = row("ok");
    assert!(ok.contains("data-state=\"succeeded\""), "{ok}");
    assert!(ok.contains("six times seven"), "the input: {ok}");
    assert!(ok.contains("\"answer\": 42"), "the output: {ok}");
    assert!(
        ok.contains("href=\"#/agent/dash-w2\""),
        "the agent, linked: {ok}"
    );
    assert!(dom.contains("<svg class=\"dag\""), "the graph: {dom}");
    // The timeline: each attempt a bar, coloured by how it ended.
    assert!(
        dom.contains("data-bar=\"ok/1\" data-outcome=\"succeeded\""),
        "ok's attempt on the timeline: {dom}"
    );
    assert!(
        dom.contains("data-bar=\"bad/1\" data-outcome=\"failed\""),
        "bad's attempt on the timeline: {dom}"
    );
    screenshot(
        &browser,
        &format!("{base}#/flow/dash-failing"),
        "dashboard-flow.png",
    )
    .await;

    // The agent: status, heartbeat age, utilisation, the task it runs now.
    let (dom, log) = render(&browser, &format!("{base}#/agent/dash-w2")).await;
    assert!(dom.contains("data-view=\"agent\""), "{dom}\n{log}");
    assert!(dom.contains("data-loaded=\"true\""), "{dom}\n{log}");
    assert!(
        dom.contains("<dd data-fact=\"status\">active</dd>"),
        "{dom}"
    );
    assert!(
        dom.contains("<dd data-fact=\"last heartbeat\">") && dom.contains(" s ago</dd>"),
        "{dom}"
    );
    assert!(dom.contains("data-resource=\"cpu\""), "{dom}");
    assert!(
        dom.contains("<td>50%</td>"),
        "one of two cpus booked: {dom}"
    );
    assert!(
        dom.contains("data-task=\"hold\""),
        "the running task: {dom}"
    );
    assert!(
        dom.contains("href=\"#/flow/dash-held\""),
        "linked to its flow: {dom}"
    );
    assert!(!log.contains("Uncaught"), "console errors:\n{log}");
    screenshot(
        &browser,
        &format!("{base}#/agent/dash-w2"),
        "dashboard-agent.png",
    )
    .await;

    // An unknown flow is said so, not drawn blank.
    let (dom, _) = render(&browser, &format!("{base}#/flow/no-such-flow")).await;
    assert!(dom.contains("refresh failed"), "{dom}");

    agent.release(1);
    agent.stop().await;
}

/// `POST path` on `addr` with an optional bearer token: status and body.
async fn http_post(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("POST {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

/// With the action token, a user clicks from the overview to a flow, from a
/// task to the agent running it and back to the flow by that agent's running
/// task, cancels the flow (a second click confirms) and drains the agent;
/// each read back over the bus. Without the token, with a wrong one, or on a
/// monitor whose actions are off, the same request is refused and changes
/// nothing.
#[tokio::test]
async fn a_user_clicks_from_a_flow_to_its_agent_and_cancels_it_in_headless_chromium() {
    let Some(browser) = chromium_or_skip() else {
        return;
    };
    common::telemetry::init_for_tests();
    let sys = System::start().await;
    let agent = HeldAgent::start(&sys, "dash-w3").await;
    let fid = sys
        .client
        .create_flow(&flow(
            "dash-act",
            vec![work("hold", &[]), work("after", &["hold"])],
        ))
        .await
        .unwrap()
        .flow_id;
    let running = || async {
        let s = sys.client.flow_status(&fid).await.unwrap();
        (
            s.state,
            s.tasks
                .iter()
                .find(|t| t.task_id.as_str() == "hold")
                .unwrap()
                .state,
        )
    };
    eventually(Duration::from_secs(20), "hold running", || async {
        (running().await == (FlowState::Running, TaskState::Running)).then_some(())
    })
    .await;

    // A second monitor replica, this one with actions on; a few quick flows
    // while it draws its charts.
    const TOKEN: &str = "a-token-of-24-characters";
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut cfg =
        ::monitor::Config::new(common::config::NatsConfig::new(sys.server.url().to_owned()));
    cfg.http_addr = addr.clone();
    cfg.actions_token = Some(TOKEN.into());
    cfg.history_step_ms = 200;
    let acting = ServiceHandle::spawn("monitor", move |rx| async move {
        ::monitor::run(cfg, async {
            let _ = rx.await;
        })
        .await
    });
    for i in 0..4 {
        run_flow(&sys.client, &format!("dash-ok-{i}"), vec![work("ok", &[])]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let off = sys.client.health_report().await.unwrap().http_addr.unwrap();
    let cancel = "/api/flows/dash-act/cancel";
    eventually(
        Duration::from_secs(20),
        "the acting monitor's HTTP",
        || async { tokio::net::TcpStream::connect(&addr).await.ok() },
    )
    .await;
    let (status, body) = http_post(&addr, cancel, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = http_post(&addr, cancel, Some("not-the-token-at-all-no")).await;
    assert_eq!(status, 401, "{body}");
    if off != addr {
        let (status, body) = http_post(&off, cancel, Some(TOKEN)).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("actions are off"), "{body}");
    }
    assert_eq!(running().await, (FlowState::Running, TaskState::Running));

    let mut b = Browser::open(&browser, &format!("http://{addr}/#/")).await;
    b.wait_for(
        "document.body.dataset.loaded === 'true' && !document.getElementById('actions-auth').hidden",
        "the overview with a field for the token",
    )
    .await;
    b.click("#token").await;
    b.type_text(TOKEN).await;
    b.click("#token-save").await;
    b.wait_for(
        "document.getElementById('token-state').textContent === 'token set'",
        "the token taken",
    )
    .await;

    // Overview → flow → the task's agent → back by the agent's running task.
    b.click("a[href='#/flow/dash-act']").await;
    b.wait_for(
        "document.body.dataset.view === 'flow' && document.querySelector('#task-hold[data-state=running]')",
        "the flow with hold running",
    )
    .await;
    b.click("#task-hold a[href='#/agent/dash-w3']").await;
    b.wait_for(
        "document.body.dataset.view === 'agent' && document.querySelector('#agent-running [data-task=hold]')",
        "the agent running hold",
    )
    .await;
    b.click("#agent-running a[href='#/flow/dash-act']").await;
    let button = "[data-action='cancel dash-act']";
    b.wait_for(
        &format!("document.body.dataset.view === 'flow' && document.querySelector(\"{button}\")"),
        "the flow's cancel button",
    )
    .await;

    // Cancel: the first click only asks for confirmation.
    b.click(button).await;
    b.wait_for(
        &format!("document.querySelector(\"{button}\").textContent === 'confirm cancel'"),
        "a request to confirm",
    )
    .await;
    assert_eq!(running().await, (FlowState::Running, TaskState::Running));
    b.click(button).await;
    b.wait_for(
        "document.getElementById('action-result').textContent === 'cancel: done'",
        "the cancel done",
    )
    .await;
    assert_eq!(
        sys.client.flow_status(&fid).await.unwrap().state,
        FlowState::Cancelled
    );
    b.wait_for(
        "document.querySelector('[data-fact=state]').textContent === 'cancelled' \
         && !document.querySelector(\"[data-action='cancel dash-act']\")",
        "the flow shown cancelled, with nothing left to cancel",
    )
    .await;

    // Drain the agent from its page, once the page shows it as it is now.
    b.click("#task-hold a[href='#/agent/dash-w3']").await;
    b.wait_for(
        "document.body.dataset.view === 'agent' \
         && document.querySelector('[data-fact=running]').textContent === '0'",
        "the agent with nothing running",
    )
    .await;
    let drain = "[data-action='drain dash-w3']";
    b.click(drain).await;
    b.wait_for(
        &format!("document.querySelector(\"{drain}\").textContent === 'confirm drain'"),
        "a request to confirm",
    )
    .await;
    b.click(drain).await;
    b.wait_for(
        "document.getElementById('action-result').textContent === 'drain: done'",
        "the drain done",
    )
    .await;
    let me = AgentId::new("dash-w3").unwrap();
    let cap = sys.client.capacity(&Default::default()).await.unwrap();
    assert_eq!(cap.agent_status.get(&me), Some(&AgentStatus::Draining));
    b.wait_for(
        "document.querySelector('[data-fact=status]').textContent === 'draining'",
        "the agent shown draining",
    )
    .await;

    // The overview's charts come from the monitor, with their axes; an
    // anomaly links to what it is about: an agent that registered and then
    // never sent a heartbeat, declared lost by the allocator.
    let gone = common::msg::RegisterAgent {
        agent_id: AgentId::new("dash-gone").unwrap(),
        capabilities: vec![],
        labels: Default::default(),
        capacity: [("cpu".to_string(), 1.0)].into(),
        heartbeat_interval_ms: 300,
    };
    sys.client.register_agent(&gone).await.unwrap();
    b.click("nav a[href='#/']").await;
    b.wait_for(
        "document.body.dataset.view === 'overview' \
         && document.querySelectorAll('#throughput text[data-time]').length === 3 \
         && document.querySelector('#throughput path[data-series=failed_per_s]') \
         && document.querySelector('#latency text[data-tick]')",
        "both charts drawn with time and value axes",
    )
    .await;
    b.click("#anomalies tr[data-kind=agent_lost] a[href='#/agent/dash-gone']")
        .await;
    b.wait_for(
        "document.body.dataset.view === 'agent' \
         && document.getElementById('agent-title').textContent === 'dash-gone' \
         && document.querySelector('[data-fact=status]').textContent === 'lost'",
        "the lost agent's page, from its anomaly",
    )
    .await;
    screenshot(
        &browser,
        &format!("http://{addr}/#/"),
        "dashboard-overview.png",
    )
    .await;

    acting.stop().await.unwrap();
    agent.stop().await;
}
