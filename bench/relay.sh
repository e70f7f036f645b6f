#!/usr/bin/env bash
# The NATS relay (`prism serve --nats-url`): how far behind the event log it
# falls while clients write as fast as they can, and how fast it publishes a
# backlog left by a broker outage. Writes are `POST /broadcast` (one event
# each) from wrk; positions come from `/metrics` (`prism_event_log_head`,
# `prism_nats_relay_position`). A private nats-server with JetStream is
# started on a port of its own and stopped for the outage. PG_URL=postgres://
# user@host/db (a database to create others from) measures PostgreSQL too, in
# a database of its own made afresh. Writes its section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
ensure_nats
release_prism
ports_free 18500 18551 18522
duration=${DURATION:-10s}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

start_nats() {
    nats-server -a 127.0.0.1 -p 18522 -js -sd "$work/js" >"$work/nats.log" 2>&1 &
    nats_pid=$!
    wait_port 18522
}

metric() { # name -> value from prism's /metrics
    curl -s localhost:18500/metrics | awk -v m="prism_$1" '$1 == m {print $2}'
}

now() { date +%s.%N; }

# Seconds until the relay's position reaches the log's head.
caught_up_after() {
    local t0 head
    t0=$(now)
    head=$(metric event_log_head)
    # The relay stores its position per batch, so it may pass the head read here.
    while [ "$(metric nats_relay_position)" -lt "$head" ]; do sleep 0.02; done
    python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(now)"
}

write_load() { # -> requests/s
    wrk -t2 -c32 -d"$duration" -s "$work/post.lua" http://127.0.0.1:18500 | awk '/Requests\/sec/ {print $2}'
}

# One database's rows of the table: the live load, then the outage.
measure() { # name [--database-url URL]
    local name=$1
    shift
    rm -rf "$work/data" "$work/js"
    start_nats
    PRISM_ADMIN_PASSWORD=bench-admin-password "$PRISM_BIN" serve --demo --data-dir "$work/data" \
        --port 18500 --grpc-port 18551 --nats-url nats://127.0.0.1:18522 --log-level error "$@" &
    local prism=$!
    wait_port 18500
    broadcast_lua "$(login_token 18500 admin bench-admin-password)" "$work/post.lua"
    while [ "$(metric nats_relay_connected)" != 1 ]; do sleep 0.05; done

    # Live: the broker up, clients writing.
    local live_rps live_position live_behind live_catch
    live_rps=$(write_load)
    # The relay reads the database, while the head is what the pump has delivered,
    # which may trail it by an event or two: less than nothing behind is nothing.
    live_position=$(metric nats_relay_position)
    live_behind=$(( $(metric event_log_head) - live_position ))
    [ "$live_behind" -ge 0 ] || live_behind=0
    live_catch=$(caught_up_after)
    echo "$name live: $live_rps writes/s; $live_behind events behind at the end; caught up ${live_catch}s later"

    # An outage: the broker stopped while clients write, then started again.
    kill "$nats_pid"; wait "$nats_pid" 2>/dev/null || true
    local before outage_rps backlog t0 reconnect drain rate
    before=$(metric nats_relay_position)
    outage_rps=$(write_load)
    backlog=$(( $(metric event_log_head) - before ))
    t0=$(now)
    start_nats
    while [ "$(metric nats_relay_connected)" != 1 ]; do sleep 0.02; done
    reconnect=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(now)")
    drain=$(caught_up_after)
    rate=$(python3 -c "import sys; print(round(int(sys.argv[1]) / float(sys.argv[2])))" "$backlog" "$drain")
    echo "$name outage: $outage_rps writes/s; relay back ${reconnect}s after the broker; backlog of $backlog events published in ${drain}s ($rate events/s)"
    kill "$prism" "$nats_pid"; wait "$prism" "$nats_pid" 2>/dev/null || true
    rows+="| $name | broker up | $live_rps | $live_behind events | ${live_catch} s later |
| $name | broker stopped, then started | $outage_rps | $backlog events (all of them) | ${drain} s after the relay reconnected (${reconnect} s after the broker started): $rate events/s |
"
}

rows=
measure SQLite
if [ -n "${PG_URL:-}" ]; then
    psql "$PG_URL" -qc "DROP DATABASE IF EXISTS prism_bench WITH (FORCE)" -c "CREATE DATABASE prism_bench"
    measure PostgreSQL --database-url "${PG_URL%/*}/prism_bench"
    psql "$PG_URL" -qc "DROP DATABASE IF EXISTS prism_bench WITH (FORCE)"
fi

write_section relay <<MD
## NATS relay: \`prism serve --nats-url\` under a write load and after a broker outage

$(machine); release build; SQLite$([ -n "${PG_URL:-}" ] && echo " and PostgreSQL (the machine's server, a database made afresh)"), a private nats-server (JetStream, file storage) on the same
machine; wrk, 2 threads, 32 connections, $duration of \`POST /broadcast\` (one event each). The
relay sends a batch of 256 events before it waits for their acknowledgements, each message
naming the one before it as the stream's last (so the stream keeps the log's order), and
stores its position once per batch.

| database | phase | writes/s | relay behind at the end of the load | caught up |
|---|---|---:|---:|---:|
$rows
MD
