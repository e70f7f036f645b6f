#!/usr/bin/env bash
# The users service's order consumer: how fast it applies a backlog of
# `order.created`, from JetStream and from the orders service's feed (what
# `prism up` uses without NATS). The orders service takes orders from wrk
# (`POST /orders`), and its relay publishes them to a private nats-server,
# while the users service's consumer is pointed at a port where nothing
# listens; then the users service starts again with the real address, and the
# time until it has applied every order is measured
# (`GET /users/{id}/order-stats`). With BEFORE=/path/to/an/earlier/prism,
# rounds alternate between that build's users service and this one's.
# SOURCES picks the sources (default "jetstream feed"). Writes its section of
# docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
ensure_nats
release_prism
ports_free 18601 18602 18622 18623
sources=${SOURCES:-jetstream feed}
duration=${DURATION:-10}
rounds=${ROUNDS:-3}
before=${BEFORE:-}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
export PRISM_JWT_SECRET=bench-secret-shared-by-the-topology PRISM_ADMIN_PASSWORD=bench-admin-password
nats=nats://127.0.0.1:18622
# Where nothing listens: the users service's consumer waits there.
nowhere=127.0.0.1:18623

now() { date +%s.%N; }

users_service() { # bin source address -> $users, its pid
    local from
    if [ "$2" = jetstream ]; then from=(--nats-url "nats://$3"); else from=(--orders-url "http://$3"); fi
    "$1" users-service --demo --data-dir "$work/users" --port 18601 "${from[@]}" --log-level error >>"$work/users.log" 2>&1 &
    users=$!
    wait_port 18601
}

# One round: a fresh broker and services, `bin`'s users service reading from
# `source`; prints "applied/s orders seconds".
round() {
    local bin=$1 source=$2
    rm -rf "$work/users" "$work/orders" "$work/js"
    nats-server -a 127.0.0.1 -p 18622 -js -sd "$work/js" >"$work/nats.log" 2>&1 &
    local broker=$!
    wait_port 18622
    users_service "$bin" "$source" "$nowhere"
    "$PRISM_BIN" orders-service --data-dir "$work/orders" --port 18602 \
        --users-url http://127.0.0.1:18601 --nats-url "$nats" --log-level error >"$work/orders.log" 2>&1 &
    local orders=$!
    wait_port 18602
    local token user
    token=$(login_token 18601 alice alice-password)
    user=$(python3 -c 'import base64,json,sys; p = sys.argv[1].split(".")[1]; print(json.loads(base64.urlsafe_b64decode(p + "==="))["sub"])' "$token")
    post_lua "$token" "$work/order.lua" /orders '{"total": 1.5}'
    wrk -t2 -c32 -d"${duration}s" -s "$work/order.lua" http://127.0.0.1:18602 >"$work/wrk.out"
    # The orders service's log holds nothing but its orders' events.
    local placed
    placed=$(curl -s localhost:18602/metrics | awk '$1 == "prism_event_log_head" {print $2}')
    # Every order published before the clock starts.
    while [ "$(curl -s localhost:18602/metrics | awk '$1 == "prism_nats_relay_position" {print $2}')" -lt "$placed" ]; do
        sleep 0.05
    done
    kill "$users"; wait "$users" 2>/dev/null || true
    local t0
    t0=$(now)
    if [ "$source" = jetstream ]; then
        users_service "$bin" jetstream 127.0.0.1:18622
    else
        users_service "$bin" feed 127.0.0.1:18602
    fi
    while [ "$(curl -s "localhost:18601/users/$user/order-stats" |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["orders"])')" -lt "$placed" ]; do
        sleep 0.05
    done
    local t1
    t1=$(now)
    kill "$users" "$orders" "$broker"
    wait "$users" "$orders" "$broker" 2>/dev/null || true
    python3 -c "import sys; n, s = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]); print(f'{n / s:.0f} {n} {s:.2f}')" \
        "$placed" "$t0" "$t1"
}

alternate=""
if [ -n "$before" ]; then
    alternate='Rounds alternate with an earlier build'"'"'s users service (`before`).'
fi
rows=""
for source in $sources; do
    for _ in $(seq "$rounds"); do
        for build in ${before:+before} this; do
            if [ "$build" = before ]; then bin=$before; label=before; else bin=$PRISM_BIN; label="this build"; fi
            read -r rate placed seconds < <(round "$bin" "$source")
            echo "$source, $label: $placed orders applied in $seconds s ($rate/s)"
            rows+="| $source | $label | $placed | $seconds | $rate |"$'\n'
        done
    done
done

write_section consumer <<MD
## Users service: applying a backlog of \`order.created\`

$(machine); release build, SQLite, a private nats-server (JetStream, file storage) on the same
machine. wrk (2 threads, 32 connections, ${duration} s) places orders through the orders service,
whose relay publishes each to JetStream; meanwhile the users service's consumer points at a port
where nothing listens. Once every order is published, the users service starts again, reading
from JetStream or from the orders service's \`/events/feed\` (as \`prism up\` does without NATS),
and the clock runs from its start until its statistics hold every order.
$alternate

| source | users service | orders | seconds | applied/s |
|---|---|---:|---:|---:|
$rows
MD
