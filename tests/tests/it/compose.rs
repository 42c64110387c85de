//! The compose files checked without starting a container (the compose test
//! target, tests/compose/, runs them): every service runs a binary the
//! workspace builds and points at the nats service, nothing pins container
//! names or host ports (so `--scale` works), JetStream keeps its data on a
//! named volume, and Compose v1 accepts every file and overlay as it is.

use std::collections::BTreeSet;

use serde_yaml::Value;
use testkit::workspace_root;

fn workspace_binaries() -> BTreeSet<String> {
    let root = workspace_root();
    let mut bins = BTreeSet::new();
    for krate in [
        "orchestrator",
        "allocator",
        "synchronizer",
        "monitor",
        "coordkit",
    ] {
        let text = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
        let manifest: toml::Value = toml::from_str(&text).unwrap();
        for bin in manifest
            .get("bin")
            .and_then(|b| b.as_array())
            .into_iter()
            .flatten()
        {
            bins.insert(bin["name"].as_str().unwrap().to_owned());
        }
    }
    bins
}

#[test]
fn compose_runs_workspace_binaries_against_the_nats_service() {
    let root = workspace_root();
    let compose: Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("docker-compose.yml")).unwrap())
            .unwrap();
    let services = compose["services"].as_mapping().unwrap();
    let bins = workspace_binaries();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();

    let nats = &compose["services"]["nats"];
    let nats_cmd = serde_yaml::to_string(&nats["command"]).unwrap();
    assert!(
        nats_cmd.contains("-js") || nats_cmd.contains("--jetstream") || nats_cmd.contains("-c"),
        "{nats_cmd}"
    );
    let volumes = serde_yaml::to_string(&nats["volumes"]).unwrap();
    let named: Vec<String> = compose["volumes"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    assert!(
        named.iter().any(|v| volumes.contains(v.as_str())),
        "nats data on a named volume: {volumes}"
    );
    assert!(nats.get("healthcheck").is_some(), "nats has a health check");

    for name in ["orchestrator", "allocator", "synchronizer", "monitor"] {
        let svc = &services[name];
        let command = svc["command"]
            .as_sequence()
            .map(|s| s[0].as_str().unwrap().to_owned())
            .or_else(|| {
                svc["command"]
                    .as_str()
                    .map(|s| s.split_whitespace().next().unwrap().to_owned())
            })
            .unwrap_or_else(|| panic!("{name} has a command"));
        let binary = command.rsplit('/').next().unwrap();
        assert!(
            bins.contains(binary),
            "{name} runs {binary}, which the workspace does not build ({bins:?})"
        );
        assert_eq!(binary, format!("coord-{name}"));
        assert!(dockerfile.contains(binary), "the Dockerfile ships {binary}");
        let env = serde_yaml::to_string(&svc["environment"]).unwrap();
        assert!(
            env.contains("NATS_URL") && env.contains("nats://nats:4222"),
            "{name} points at the nats service: {env}"
        );
        assert!(
            svc.get("container_name").is_none(),
            "{name} must not pin a container name"
        );
        assert!(svc.get("ports").is_none(), "{name} must not pin host ports");
        let check = serde_yaml::to_string(&svc["healthcheck"]["test"]).unwrap();
        assert!(
            check.contains(binary) && check.contains("--healthcheck"),
            "{name} checks itself: {check}"
        );
        assert!(
            svc.get("healthcheck").is_some(),
            "{name} has a health check"
        );
        let depends = serde_yaml::to_string(&svc["depends_on"]).unwrap();
        assert!(depends.contains("nats"), "{name} starts after nats");
    }
}

/// The isolating overlay: nats loads `nats-isolated.conf` (mounted next to
/// the files it includes), every service logs in as `coord-service`, the demo
/// agent as itself, and every password the server's config reads is given to it.
#[test]
fn the_isolating_overlay_logs_every_client_in() {
    let root = workspace_root();
    let overlay: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/compose.isolated.yml")).unwrap(),
    )
    .unwrap();
    let base: Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("docker-compose.yml")).unwrap())
            .unwrap();
    let nats = &overlay["services"]["nats"];
    assert!(serde_yaml::to_string(&nats["command"])
        .unwrap()
        .contains("/etc/nats/nats-isolated.conf"));
    let mounts = serde_yaml::to_string(&nats["volumes"]).unwrap()
        + &serde_yaml::to_string(&base["services"]["nats"]["volumes"]).unwrap();
    for file in ["nats.conf", "nats-auth.conf", "nats-isolated.conf"] {
        assert!(root.join("deploy").join(file).exists());
        assert!(
            mounts.contains(&format!("./deploy/{file}:/etc/nats/{file}")),
            "{file} mounted: {mounts}"
        );
    }
    let auth = std::fs::read_to_string(root.join("deploy/nats-auth.conf")).unwrap();
    let nats_env = serde_yaml::to_string(&nats["environment"]).unwrap();
    for var in auth.split('$').skip(1).filter_map(|rest| {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        name.ends_with("_PASSWORD").then_some(name)
    }) {
        assert!(nats_env.contains(&var), "nats is given {var}: {nats_env}");
    }
    for name in ["orchestrator", "allocator", "synchronizer", "monitor"] {
        let env = serde_yaml::to_string(&overlay["services"][name]["environment"]).unwrap();
        assert!(
            env.contains("NATS_USER: coord-service") && env.contains("NATS_PASSWORD"),
            "{name} logs in: {env}"
        );
    }
    let agent = serde_yaml::to_string(&overlay["services"]["demo-agent"]["environment"]).unwrap();
    assert!(agent.contains("NATS_USER: demo-agent"), "{agent}");
    // The agents' accounts come from a file of their own, by default the
    // shipped (empty) one; the demo agent's from the demo file.
    assert!(
        mounts.contains("${COORD_AGENTS_FILE:-./deploy/agents.conf}:/etc/nats/agents.conf"),
        "{mounts}"
    );
    assert!(auth.contains("include ./agents.conf"));
    let demo = std::fs::read_to_string(root.join("deploy/agents.demo.conf")).unwrap();
    assert!(demo.contains("user: \"demo-agent\""));
    assert!(demo.contains("$DEMO_AGENT_PASSWORD"));
    assert!(
        nats_env.contains("DEMO_AGENT_PASSWORD"),
        "nats is given the demo password: {nats_env}"
    );
}

/// The cluster overlay: three nodes, each with its own store and the cluster
/// config routing to all three by service name; every client knows all three
/// and asks for 3 replicas.
#[test]
fn the_cluster_overlay_runs_three_routed_nodes() {
    let root = workspace_root();
    let mut overlay: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/compose.cluster.yml")).unwrap(),
    )
    .unwrap();
    // The nodes share their settings through `<<: *node`.
    overlay.apply_merge().unwrap();
    let conf = std::fs::read_to_string(root.join("deploy/nats-cluster.conf")).unwrap();
    let nodes = ["nats", "nats-2", "nats-3"];
    let mut names = BTreeSet::new();
    for node in nodes {
        assert!(
            conf.contains(&format!("nats-route://{node}:6222")),
            "routes reach {node}"
        );
        let svc = &overlay["services"][node];
        assert!(serde_yaml::to_string(&svc["command"])
            .unwrap()
            .contains("/etc/nats/nats-cluster.conf"));
        names.insert(svc["environment"]["NATS_SERVER_NAME"].as_str().unwrap());
        let volumes = serde_yaml::to_string(&svc["volumes"]).unwrap();
        assert!(volumes.contains("./deploy/nats-cluster.conf:/etc/nats/nats-cluster.conf"));
    }
    assert_eq!(names.len(), 3, "every node has a name of its own");
    for node in ["nats-2", "nats-3"] {
        let volumes = serde_yaml::to_string(&overlay["services"][node]["volumes"]).unwrap();
        assert!(volumes.contains(&format!("nats-data-{}:/data", &node[5..])));
        assert!(volumes.contains("./deploy/nats.conf:/etc/nats/nats.conf"));
    }
    for name in [
        "orchestrator",
        "allocator",
        "synchronizer",
        "monitor",
        "demo-agent",
    ] {
        let env = &overlay["services"][name]["environment"];
        let url = env["NATS_URL"].as_str().unwrap();
        for node in nodes {
            assert!(
                url.contains(&format!("nats://{node}:4222")),
                "{name}: {url}"
            );
        }
        assert_eq!(env["COORD_JS_REPLICAS"].as_str(), Some("3"), "{name}");
    }
    // Failover takes seconds; a 1 s heartbeat would get the agent declared lost.
    let beat = &overlay["services"]["demo-agent"]["environment"]["COORD_HEARTBEAT_MS"];
    assert!(beat.as_str().and_then(|b| b.parse::<u64>().ok()) >= Some(5_000));
}

/// The `observability` profile: Prometheus, pinned by version and digest,
/// reading the shipped config and rules, scraping the monitor's port.
#[test]
fn the_observability_profile_runs_a_pinned_prometheus_on_the_shipped_config() {
    let root = workspace_root();
    let compose: Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("docker-compose.yml")).unwrap())
            .unwrap();
    let prom = &compose["services"]["prometheus"];
    assert_eq!(
        serde_yaml::to_string(&prom["profiles"]).unwrap().trim(),
        "- observability"
    );
    let image = prom["image"].as_str().unwrap();
    assert!(
        image.starts_with("prom/prometheus:v") && image.contains("@sha256:"),
        "pinned: {image}"
    );
    let volumes = serde_yaml::to_string(&prom["volumes"]).unwrap();
    assert!(
        volumes.contains("./deploy/prometheus:/etc/prometheus"),
        "{volumes}"
    );
    let command = serde_yaml::to_string(&prom["command"]).unwrap();
    assert!(
        command.contains("/etc/prometheus/prometheus.yml"),
        "{command}"
    );
    let config: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    for rules in config["rule_files"].as_sequence().unwrap() {
        assert!(root
            .join("deploy/prometheus")
            .join(rules.as_str().unwrap())
            .exists());
    }
    let job = &config["scrape_configs"][0];
    assert_eq!(job["dns_sd_configs"][0]["names"][0], "monitor");
    let port = job["dns_sd_configs"][0]["port"].as_u64().unwrap();
    let expose = serde_yaml::to_string(&compose["services"]["monitor"]["expose"]).unwrap();
    assert!(expose.contains(&port.to_string()), "{expose} vs {port}");
}

/// The file and overlay combinations the README names, each with the
/// variables it needs: `docker-compose config` (Compose v1, which rejects
/// keys v2 accepts, such as a top-level `name:`) takes each of them, and an
/// overlay asks for a secret only where it is used.
#[test]
fn compose_v1_accepts_every_file_and_overlay() {
    let root = workspace_root();
    let present = std::process::Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but docker-compose is not installed"
        );
        eprintln!("SKIPPED: no docker-compose here to check the compose files with");
        return;
    }
    let config = |files: &[&str], profile: Option<&str>, env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new("docker-compose");
        cmd.current_dir(&root).args(["-p", "coordkit-config-check"]);
        for var in [
            "COORD_SERVICE_PASSWORD",
            "COORD_OPERATOR_PASSWORD",
            "DEMO_AGENT_PASSWORD",
            "COORD_AGENTS_FILE",
            "COORD_NATS_BIND",
            "COORD_NATS_PORT",
            "COORD_NATS_MONITOR_PORT",
        ] {
            cmd.env_remove(var);
        }
        for file in files {
            cmd.args(["-f", file]);
        }
        if let Some(profile) = profile {
            cmd.args(["--profile", profile]);
        }
        cmd.envs(env.iter().copied()).arg("config");
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let passwords = [
        ("COORD_SERVICE_PASSWORD", "s"),
        ("COORD_OPERATOR_PASSWORD", "o"),
    ];
    let demo = [
        ("COORD_SERVICE_PASSWORD", "s"),
        ("COORD_OPERATOR_PASSWORD", "o"),
        ("COORD_AGENTS_FILE", "./deploy/agents.demo.conf"),
        ("DEMO_AGENT_PASSWORD", "d"),
    ];
    /// Files, profile, variables.
    type Case<'a> = (&'a [&'a str], Option<&'a str>, &'a [(&'a str, &'a str)]);
    let cases: [Case; 6] = [
        (&["docker-compose.yml"], None, &[]),
        (&["docker-compose.yml"], Some("demo"), &[]),
        (
            &["docker-compose.yml", "deploy/compose.cluster.yml"],
            None,
            &[],
        ),
        (
            &["docker-compose.yml", "deploy/compose.cluster.yml"],
            Some("demo"),
            &[],
        ),
        (
            &["docker-compose.yml", "deploy/compose.isolated.yml"],
            None,
            &passwords,
        ),
        (
            &["docker-compose.yml", "deploy/compose.isolated.yml"],
            Some("demo"),
            &demo,
        ),
    ];
    for (files, profile, env) in cases {
        let (ok, out, err) = config(files, profile, env);
        assert!(ok, "{files:?} {profile:?}: {err}");
        // NATS takes clients without a login: published on loopback only.
        let ports: Vec<&str> = out
            .lines()
            .filter(|l| l.trim_start().starts_with("- ") && l.contains(":4222"))
            .collect();
        assert!(!ports.is_empty(), "{files:?}: nats is published\n{out}");
        for port in &ports {
            assert!(port.contains("127.0.0.1:"), "{files:?}: {port}");
        }
    }
    // The isolating overlay without its passwords is refused, naming the one missing.
    let (ok, _, err) = config(
        &["docker-compose.yml", "deploy/compose.isolated.yml"],
        None,
        &[],
    );
    assert!(!ok && err.contains("COORD_SERVICE_PASSWORD"), "{err}");
    // Opening NATS to other hosts is a deliberate choice.
    let (ok, out, err) = config(
        &["docker-compose.yml"],
        None,
        &[("COORD_NATS_BIND", "0.0.0.0")],
    );
    assert!(ok && out.contains("0.0.0.0:4222:4222"), "{out}{err}");
    let base = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let base: Value = serde_yaml::from_str(&base).unwrap();
    assert!(
        base.get("name").is_none(),
        "Compose v1 rejects a top-level name"
    );
    let dotenv = std::fs::read_to_string(root.join(".env")).unwrap();
    assert!(dotenv.contains("COMPOSE_PROJECT_NAME=coordkit"), "{dotenv}");
}
