//! The isolating deployment as the docs describe it (`deploy/nats-auth.conf`,
//! an account per agent from `deploy/agent-user.sh`), for tests of any crate.

use std::process::Command;
use std::time::Duration;

use common::config::NatsConfig;
use common::{AgentId, Client};

use crate::{start_service, wait_for_service, workspace_root, NatsServer, ServiceHandle};

/// The services' login.
pub const SERVICE: (&str, &str) = ("coord-service", "service-secret");
/// The operators' login.
pub const OPERATOR: (&str, &str) = ("coord-operator", "operator-secret");

/// The password of `agent`'s user.
pub fn password(agent: &str) -> String {
    format!("{agent}-secret")
}

/// The account `deploy/agent-user.sh` prints for `agent`: the tests use the
/// operator's own tool, so a change to it is tested.
pub fn agent_entry(agent: &str) -> String {
    let out = Command::new("sh")
        .arg(workspace_root().join("deploy/agent-user.sh"))
        .args([agent, &password(agent)])
        .output()
        .expect("run deploy/agent-user.sh");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).expect("agent-user.sh prints text")
}

/// A server with `deploy/nats-auth.conf`, its passwords defined in the file
/// (as the environment would) and an account for each of `agents` where the
/// agents file is included.
pub fn isolated_server(agents: &[&str]) -> NatsServer {
    let auth = std::fs::read_to_string(workspace_root().join("deploy/nats-auth.conf"))
        .expect("deploy/nats-auth.conf");
    let marker = "  include ./agents.conf\n";
    assert!(
        auth.contains(marker),
        "nats-auth.conf no longer includes the agents file"
    );
    let entries: String = agents.iter().map(|a| agent_entry(a)).collect();
    let auth = auth.replacen(marker, &entries, 1);
    let vars = format!(
        "COORD_SERVICE_PASSWORD: \"{}\"\nCOORD_OPERATOR_PASSWORD: \"{}\"\n",
        SERVICE.1, OPERATOR.1,
    );
    NatsServer::start_with_config(&format!("{vars}{auth}"))
}

/// `server`'s configuration logged in as `user` with `pass`.
pub fn login(server: &NatsServer, (user, pass): (&str, &str)) -> NatsConfig {
    let mut cfg = server.config();
    cfg.nats_user = Some(user.to_owned());
    cfg.nats_password = Some(pass.to_owned());
    cfg
}

/// The four services logged in as `coord-service` and answering, and an
/// operator's connection with a client over it.
pub async fn serve_isolated(
    server: &NatsServer,
) -> (Vec<ServiceHandle>, async_nats::Client, Client) {
    let services = crate::SERVICES
        .iter()
        .map(|n| start_service(n, login(server, SERVICE)))
        .collect();
    let operator = common::nats::connect(&login(server, OPERATOR), "operator")
        .await
        .unwrap();
    for name in crate::SERVICES {
        wait_for_service(&operator, name).await;
    }
    let ops = Client::new(operator.clone()).with_timeout(Duration::from_secs(10));
    (services, operator, ops)
}

/// How an agent connects: as the user named after it, with its own inboxes.
pub fn agent_login(server: &NatsServer, agent: &AgentId) -> NatsConfig {
    let mut cfg = login(server, (agent.as_str(), &password(agent.as_str())));
    cfg.nats_inbox_prefix = Some(coordkit::agent::inbox_prefix(agent));
    cfg
}
