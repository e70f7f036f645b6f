#!/usr/bin/env bash
# The gateway through rolling restarts: GET /api/users/1 under steady load
# (wrk) while the users service's two instances are restarted in turn, one
# killed outright (SIGKILL, a crash) and one stopped gracefully (SIGTERM, a
# deploy). Counts what the clients saw, by status, and the gateway's memory
# and open files before and after. Writes its section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
release_prism
duration=${DURATION:-60}
rounds=${ROUNDS:-5}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# A users instance on `port`, its pid in $work/port.pid.
start_users() {
    "$PRISM_BIN" users-service --demo --data-dir "$work/u$1" --port "$1" --log-level warn 2>>"$work/u$1.log" &
    echo $! >"$work/$1.pid"
    wait_port "$1"
}
start_users 18101
start_users 18102
cat >"$work/registry.toml" <<TOML
[services.users]
instances = ["http://127.0.0.1:18101", "http://127.0.0.1:18102"]
[services.orders]
instances = ["http://127.0.0.1:18103"]
[services.products]
instances = ["http://127.0.0.1:18152"]
TOML
"$PRISM_BIN" gateway --registry "$work/registry.toml" --data-dir "$work/gateway" --port 18100 --log-level warn 2>"$work/gateway.log" &
gateway=$!
wait_port 18100
url=http://127.0.0.1:18100/api/users/1
wrk -t2 -c32 -d2s "$url" >/dev/null
rss() { awk '/VmRSS/ {print $2}' "/proc/$gateway/status"; }
fds() { ls "/proc/$gateway/fd" | wc -l; }
rss0=$(rss)
fds0=$(fds)
# The warm-up's requests are subtracted from the counts below.
metrics0=$(curl -s http://127.0.0.1:18100/metrics)

wrk -t2 -c32 -d"${duration}s" "$url" >"$work/wrk.out" &
load=$!
# Each round: one instance crashes and comes back 3 s later; 4 s after
# that, the other is stopped gracefully and started again at once.
for _ in $(seq "$rounds"); do
    sleep 4
    kill -KILL "$(cat "$work/18101.pid")"
    wait "$(cat "$work/18101.pid")" 2>/dev/null || true
    sleep 3
    start_users 18101
    sleep 4
    kill -TERM "$(cat "$work/18102.pid")"
    wait "$(cat "$work/18102.pid")" 2>/dev/null || true
    start_users 18102
done
wait "$load"
metrics1=$(curl -s http://127.0.0.1:18100/metrics)
health=$(curl -s http://127.0.0.1:18100/healthz)
# Let the connections wrk left close before counting files again.
sleep 2
rss1=$(rss)
fds1=$(fds)

requests=$(awk '/requests in/ {print $1}' "$work/wrk.out")
# Answers by status during the load: the gateway's request counter after
# minus before.
by_status=$(python3 - "$metrics0" "$metrics1" <<'PY'
import re, sys
def counts(text):
    c = {}
    for line in text.splitlines():
        m = re.match(r'prism_gateway_requests_total\{(.*)\} (\d+)', line)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1])) if m else {}
        if labels.get("route") == "/api/users/{user_id}":
            c[labels["status"]] = int(m[2])
    return c
a, b = counts(sys.argv[1]), counts(sys.argv[2])
print(", ".join(f"{s}: {b[s] - a.get(s, 0)}" for s in sorted(b) if b[s] - a.get(s, 0)))
PY
)
non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.out")
errors=$(awk '/Socket errors/ {print $0}' "$work/wrk.out" | sed 's/^ *//')
circuits=$(python3 -c 'import json, sys
users = json.loads(sys.argv[1])["upstreams"]["users"]
print(", ".join("%s: circuit %s, %s" % (i["url"], i["circuit"], "healthy" if i["healthy"] else "unhealthy") for i in users))' "$health")

write_section restarts <<MD
## Gateway through rolling restarts

$(machine); release build. wrk (2 threads, 32 connections, ${duration} s) asks the gateway
for \`GET /api/users/1\` while the users service's two instances are restarted in turn, $rounds
times: one is killed (SIGKILL) and started again 3 s later, and 4 s after that the other is
stopped gracefully (SIGTERM) and started again at once. The gateway runs with its defaults
(two retries for GETs, circuits opening after 5 failures for 10 s, health checks every second).

| | |
|---|---|
| requests | $requests |
| answers by status | $by_status |
| not 2xx (wrk) | ${non2xx:-0} |
| socket errors (wrk) | ${errors:-none} |
| users instances afterwards | $circuits |
| gateway RSS before / after | $rss0 KiB / $rss1 KiB |
| gateway open files before / after (pooled upstream connections included) | $fds0 / $fds1 |
MD
echo "requests $requests; $by_status; non-2xx ${non2xx:-0}; rss $rss0 -> $rss1 KiB; fds $fds0 -> $fds1; $circuits"
