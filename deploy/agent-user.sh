#!/bin/sh
# Prints the nats-server `users` entry for one agent of an isolating server
# (deploy/nats-auth.conf): paste it into the users list and reload the server
# (`nats-server --signal reload`, or restart the container).
#
#   deploy/agent-user.sh AGENT_ID PASSWORD
#
# PASSWORD is written as given: `'$VAR'` (quoted for the shell) makes the server
# read it from its environment, anything else becomes a literal; a bcrypt hash
# (`nats server passwd`) keeps it out of the file.
#
# The agent may publish only what the protocol asks of it: its heartbeats,
# reports and sync acknowledgements, its (de)registration, leave and state requests on
# its own subjects (`coord.agents.{id}.register`, `.state.put`, …: the services
# refuse a body naming another agent there), reads of any agent's state
# (`coord.sync.state.get`/`history`, read-only), and the JetStream API calls
# that open and pull its own durable consumer `agent-{id}` on COORD_ASSIGN and
# acknowledge what it pulled (and delete that consumer: an agent restarted
# after dying mid-task makes it afresh so its unacknowledged assignments are
# delivered again at once). The shared write subjects (`coord.agents.register`,
# `coord.sync.state.put`, …) name the agent only in the JSON, so they stay
# closed to agents. It may subscribe only to its own inboxes (`_INBOX_{id}.>`:
# connect with NATS_INBOX_PREFIX=_INBOX_{id}; `coordctl agent` and the Python
# example agent do so), its cancel notices, report verdicts and sync notices, and `agent.lost` events.
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
cat <<ENTRY
    { user: "$id", password: $pass, permissions: {
        publish: { allow: [
          "coord.agents.$id.heartbeat", "coord.agents.$id.report", "coord.agents.$id.sync.ack",
          "coord.agents.$id.register", "coord.agents.$id.deregister", "coord.agents.$id.leave",
          "coord.agents.$id.state.get", "coord.agents.$id.state.put",
          "coord.agents.$id.state.delete", "coord.agents.$id.state.history",
          "coord.sync.state.get", "coord.sync.state.history",
          "\$JS.API.STREAM.INFO.COORD_ASSIGN",
          "\$JS.API.CONSUMER.INFO.COORD_ASSIGN.agent-$id",
          "\$JS.API.CONSUMER.CREATE.COORD_ASSIGN.agent-$id.coord.agents.$id.assign",
          "\$JS.API.CONSUMER.DELETE.COORD_ASSIGN.agent-$id",
          "\$JS.API.CONSUMER.MSG.NEXT.COORD_ASSIGN.agent-$id",
          "\$JS.ACK.COORD_ASSIGN.agent-$id.>"
        ] }
        subscribe: { allow: [
          "_INBOX_$id.>", "coord.agents.$id.cancel", "coord.agents.$id.rejected", "coord.agents.$id.sync",
          "coord.events.agent.lost"
        ] }
    } }
ENTRY
