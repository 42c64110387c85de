//! Headless Chromium driven over the DevTools protocol, as a user would:
//! open a page, wait for what it shows, click at an element's place, type.
//!
//! The protocol runs over `--remote-debugging-pipe` (JSON messages ending in
//! a NUL byte, commands on the browser's fd 3, answers on its fd 4), so no
//! port, websocket or driver binary is involved: the shell hands the
//! browser our stdin and stdout as those two descriptors.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How every test starts Chromium: headless, no sandbox or GPU (containers,
/// CI), nothing fetched from the network on its own.
pub(crate) const HEADLESS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
];

/// Longest wait for one protocol answer.
const ANSWER: Duration = Duration::from_secs(30);

pub(crate) struct Browser {
    _child: Child,
    _profile: tempfile::TempDir,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    next_id: u64,
    session: Option<String>,
}

impl Browser {
    /// Starts `chromium` headless with a fresh profile and opens `url` in a
    /// 1200×900 tab.
    pub(crate) async fn open(chromium: &Path, url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut command = tokio::process::Command::new("sh");
        testkit::tie_to_parent(command.as_std_mut());
        let mut child = command
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
            .arg(chromium)
            .args(HEADLESS)
            .arg("--remote-debugging-pipe")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let mut b = Browser {
            to: child.stdin.take().unwrap(),
            from: BufReader::new(child.stdout.take().unwrap()),
            _child: child,
            _profile: profile,
            next_id: 0,
            session: None,
        };
        let target = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        b.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        b.call("Page.navigate", json!({"url": url})).await;
        b
    }

    /// Sends one command (to the tab once attached) and returns its result;
    /// events in between are skipped.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).await.unwrap();
        self.to.flush().await.unwrap();
        let deadline = Instant::now() + ANSWER;
        loop {
            let mut buf = Vec::new();
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.from.read_until(0, &mut buf))
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within {ANSWER:?}"))
                .unwrap();
            assert!(n > 0, "chromium closed the pipe during {method}");
            buf.pop();
            let answer: Value = serde_json::from_slice(&buf).unwrap();
            if answer["id"] != json!(id) {
                continue;
            }
            if let Some(e) = answer.get("error") {
                panic!("{method} failed: {e}");
            }
            return answer["result"].clone();
        }
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub(crate) async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression} threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy in the page; its value. While the
    /// page loads (or re-renders) the expression may throw: that is "not yet".
    pub(crate) async fn wait_for(&mut self, expression: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let guarded = format!(
            "(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        );
        loop {
            let v = self.eval(&guarded).await;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            if Instant::now() > deadline {
                let body = self
                    .eval("document.body ? document.body.innerText : '(no body)'")
                    .await;
                panic!("the page never showed {what} ({expression}); it shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the middle of the first element matching `selector`, with the
    /// mouse: pressed and released there, as a user's click — once nothing
    /// covers that spot.
    pub(crate) async fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let at = self
            .wait_for(
                &format!(
                    "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                     e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                     if (!(r.width > 0)) return null; \
                     const x = r.x + r.width / 2, y = r.y + r.height / 2; \
                     const hit = document.elementFromPoint(x, y); \
                     return hit && (hit === e || e.contains(hit)) ? [x, y] : null; }})()"
                ),
                &format!("something to click at {selector}"),
            )
            .await;
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for (kind, button) in [
            ("mouseMoved", "none"),
            ("mousePressed", "left"),
            ("mouseReleased", "left"),
        ] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": button, "clickCount": 1}),
            )
            .await;
        }
    }

    /// Types `text` into whatever has the focus.
    pub(crate) async fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({ "text": text })).await;
    }
}
