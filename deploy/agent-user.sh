#!/bin/sh
# Prints the nats-server account of one agent of an isolating server
# (deploy/nats-auth.conf): add it to the agents file (deploy/agents.conf) and
# reload the server (`nats-server --signal reload`, or restart the container).
# Revoking the agent is removing the block and reloading: its connections are
# closed and its login refused.
#
#   deploy/agent-user.sh AGENT_ID PASSWORD
#
# PASSWORD is written as given: `'$VAR'` (quoted for the shell) makes the server
# read it from its environment, anything else becomes a literal; a bcrypt hash
# (`nats server passwd`) keeps it out of the file.
#
# The account AGENT_{id} has one user, named after the agent (connect with
# NATS_INBOX_PREFIX=_INBOX_{id}; `coordctl agent` and the Python example agent
# do so), no JetStream and no exports. It imports from COORD only what the protocol asks of the agent,
# each on the agent's own subject: its heartbeats, reports, sync
# acknowledgements, (de)registration, leave and state requests (the services
# refuse a body naming another agent there), its own events
# (`coord.agents.{id}.events.{type}`), reads of any agent's state
# (`coord.sync.state.get`/`history`, read-only), and its assignments, cancel
# notices, report verdicts, sync notices and `agent.lost` events. No JetStream
# API: a report is a publish on the agent's own subject that the COORD
# account's stream stores and acknowledges.
#
# The shared write subjects (`coord.agents.register`, `coord.sync.state.put`,
# …) name the agent only in the JSON, so they are not imported. Replies come
# back to the agent's own account whatever reply subject it names.
#
# Limits, per agent account (override with the environment):
#   COORD_AGENT_MAX_CONNECTIONS (default 4), COORD_AGENT_MAX_SUBSCRIPTIONS
#   (default 256), COORD_AGENT_MAX_PAYLOAD (bytes, default 1048576).
set -eu
if [ $# -ne 2 ]; then
    echo "usage: $0 AGENT_ID PASSWORD" >&2
    exit 2
fi
id=$1
pass=$2
if ! printf '%s' "$id" | grep -Eq '^[A-Za-z0-9_-]{1,64}$'; then
    echo "error: an agent id matches ^[A-Za-z0-9_-]{1,64}\$" >&2
    exit 2
fi
case $pass in
    \$*) ;;
    *) pass="\"$(printf '%s' "$pass" | sed 's/[\\"]/\\&/g')\"" ;;
esac
conns=${COORD_AGENT_MAX_CONNECTIONS:-4}
subs=${COORD_AGENT_MAX_SUBSCRIPTIONS:-256}
payload=${COORD_AGENT_MAX_PAYLOAD:-1048576}
for n in "$conns" "$subs" "$payload"; do
    case $n in
        ''|*[!0-9]*) echo "error: a limit is a whole number, got '$n'" >&2; exit 2 ;;
    esac
done
svc() {
    printf '      { service: { account: COORD, subject: "%s" } }\n' "$1"
}
str() {
    printf '      { stream: { account: COORD, subject: "%s" } }\n' "$1"
}
echo "  \"AGENT_$id\": {"
# The user's permissions say again, subject by subject, what the imports
# allow: anything else is refused by the server at once, with a permissions
# violation, rather than going nowhere.
cat <<USER
    users: [ { user: "$id", password: $pass, permissions: {
        publish: { allow: [
          "coord.agents.$id.heartbeat", "coord.agents.$id.report", "coord.agents.$id.sync.ack",
          "coord.agents.$id.register", "coord.agents.$id.deregister", "coord.agents.$id.leave",
          "coord.agents.$id.state.get", "coord.agents.$id.state.put",
          "coord.agents.$id.state.delete", "coord.agents.$id.state.history",
          "coord.agents.$id.events.*",
          "coord.sync.state.get", "coord.sync.state.history"
        ] }
        subscribe: { allow: [
          "_INBOX_$id.>", "coord.agents.$id.assign", "coord.agents.$id.cancel",
          "coord.agents.$id.rejected", "coord.agents.$id.sync",
          "coord.events.agent.lost"
        ] }
    } } ]
USER
echo "    limits: { max_connections: $conns, max_subscriptions: $subs, max_payload: $payload }"
echo "    imports: ["
for s in heartbeat report sync.ack register deregister leave \
    state.get state.put state.delete state.history; do
    svc "coord.agents.$id.$s"
done
# Its own events, one subject token per type (the synchronizer stores them
# under the agent the subject names).
svc "coord.agents.$id.events.*"
svc "coord.sync.state.get"
svc "coord.sync.state.history"
for s in assign cancel rejected sync; do
    str "coord.agents.$id.$s"
done
str "coord.events.agent.lost"
echo "    ]"
echo "  }"
