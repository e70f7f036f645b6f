#!/usr/bin/env bash
# The gateway under a burst of clients: thousands of wrk connections asking
# for `GET /api/users/1` at once, with the gateway's connections to the users
# service capped (its defaults) and, in the same run, uncapped (as before the
# cap, every waiting client got a connection of its own). Counts the answers
# by status, the latency, the most connections the gateway held to the users
# service, and the connects that failed. Writes its section of
# docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
release_prism
clients=${CLIENTS:-3000 6000}
duration=${DURATION:-10}
rounds=${ROUNDS:-2}
# wrk needs a descriptor per client; the gateway raises its own limit.
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

"$PRISM_BIN" users-service --demo --data-dir "$work/users" --port 18101 --log-level error &
wait_port 18101

# One round: a fresh gateway with `extra` in the users service's entry, under
# a burst of `n` clients; prints one Markdown table row.
round() {
    local n=$1 label=$2 extra=$3
    cat >"$work/registry.toml" <<TOML
[services.users]
instances = ["http://127.0.0.1:18101"]
$extra
[services.orders]
instances = ["http://127.0.0.1:18102"]
[services.products]
instances = ["http://127.0.0.1:18152"]
TOML
    "$PRISM_BIN" gateway --registry "$work/registry.toml" --data-dir "$work/gateway" --port 18100 --log-level error &
    local gateway=$!
    wait_port 18100
    # The gateway's connections to the users service, sampled four times a
    # second while the load runs.
    count_connections "$gateway" 18101 >"$work/conns" &
    local sampler=$!
    wrk -t2 -c"$n" -d"${duration}s" --latency http://127.0.0.1:18100/api/users/1 >"$work/wrk.out"
    local metrics
    metrics=$(curl -s http://127.0.0.1:18100/metrics)
    kill "$gateway"
    wait "$gateway" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    python3 - "$n" "$label" "$metrics" "$work/wrk.out" "$work/conns" <<'PY'
import re, sys
n, label, metrics = int(sys.argv[1]), sys.argv[2], sys.argv[3]
wrk, conns = open(sys.argv[4]).read(), open(sys.argv[5]).read()
by_status, unreachable = {}, 0
for line in metrics.splitlines():
    m = re.match(r'prism_gateway_(\w+)\{(.*)\} (\d+)$', line)
    if not m:
        continue
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
    if m[1] == "requests_total" and labels.get("route") == "/api/users/{user_id}" and int(m[3]):
        by_status[labels["status"]] = int(m[3])
    if m[1] == "upstream_failures_total" and labels.get("upstream") == "users" and labels.get("kind") == "unreachable":
        unreachable = int(m[3])
latency = dict(re.findall(r'^\s+(50|99)%\s+(\S+)', wrk, re.M))
timeouts = re.search(r'timeout (\d+)', wrk)
peak = max((int(n) for n in conns.split()), default=0)
total = sum(by_status.values())
ok = by_status.get("200", 0)
status = ", ".join(f"{s}: {n:,}" for s, n in sorted(by_status.items()))
print(f"| {n:,} | {label} | {total:,} | {status} | {100 * ok / max(total, 1):.1f}% | {latency.get('50', '-')} | {latency.get('99', '-')} | {peak} | {unreachable} | {timeouts[1] if timeouts else 0} |")
PY
}

rows=""
for n in $clients; do
    for _ in $(seq "$rounds"); do
        rows+=$(round "$n" "capped (default: 256 connections)" "")$'\n'
        rows+=$(round "$n" "uncapped" "max_connections = 1000000")$'\n'
    done
done

write_section burst <<MD
## Gateway under a burst of clients

$(machine); release build. wrk (2 threads, $(echo $clients | sed 's/ / or /g') connections, ${duration} s) asks the gateway
for \`GET /api/users/1\`, served by one users-service instance. Rounds alternate between the
gateway's defaults, which cap its connections to an instance, and the same build without the
cap (\`max_connections = 1000000\`), which is how the gateway behaved before the cap: each
client waiting on the users service had a connection of its own. Each round starts a fresh
gateway. "Peak connections" is the most connections from the gateway to the users service seen
(sampled four times a second; the health checks' own connection included); "failed connects" are tries counted against the instance as
unreachable, each one a step towards opening its circuit.

| clients | gateway | answers | by status | 200 | p50 | p99 | peak connections | failed connects | wrk timeouts |
|---:|---|---:|---|---:|---:|---:|---:|---:|---:|
$rows
MD
printf '%s' "$rows"
