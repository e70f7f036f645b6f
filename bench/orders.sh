#!/usr/bin/env bash
# The orders service's `GET /orders/1`, which asks the users service for the
# order's user on every request: throughput, latency, the CPU each service
# spends per request, and the most connections the orders service held to the
# users service. With BEFORE=/path/to/an/earlier/prism, rounds alternate
# between that build and this one. Writes its section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
release_prism
clients=${CLIENTS:-64 1000}
duration=${DURATION:-10}
rounds=${ROUNDS:-3}
before=${BEFORE:-}
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# User + system CPU time of a process, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One round: fresh services from `bin`, `n` wrk clients; one Markdown row.
round() {
    local bin=$1 label=$2 n=$3
    rm -rf "$work/users" "$work/orders"
    "$bin" users-service --demo --data-dir "$work/users" --port 18201 --log-level error &
    local users=$!
    wait_port 18201
    "$bin" orders-service --demo --data-dir "$work/orders" --port 18202 \
        --users-url http://127.0.0.1:18201 --log-level error &
    local orders=$!
    wait_port 18202
    wrk -t2 -c"$n" -d2s http://127.0.0.1:18202/orders/1 >/dev/null
    count_connections "$orders" 18201 >"$work/conns" &
    local sampler=$!
    local u0 o0 u1 o1
    u0=$(ticks "$users") o0=$(ticks "$orders")
    wrk -t2 -c"$n" -d"${duration}s" --latency http://127.0.0.1:18202/orders/1 >"$work/wrk.out"
    u1=$(ticks "$users") o1=$(ticks "$orders")
    kill "$orders" "$users"
    wait "$orders" "$users" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    python3 - "$n" "$label" "$((o1 - o0))" "$((u1 - u0))" "$(getconf CLK_TCK)" "$work/wrk.out" "$work/conns" <<'PY'
import re, sys
n, label = int(sys.argv[1]), sys.argv[2]
orders, users, hz = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
wrk, conns = open(sys.argv[6]).read(), open(sys.argv[7]).read()
served = int(re.search(r'(\d+) requests in', wrk)[1])
rps = float(re.search(r'Requests/sec:\s+([\d.]+)', wrk)[1])
latency = dict(re.findall(r'^\s+(50|99)%\s+(\S+)', wrk, re.M))
failed = re.search(r'Non-2xx or 3xx responses: (\d+)', wrk)
peak = max((int(c) for c in conns.split()), default=0)
us = lambda t: f"{t * 1e6 / hz / max(served, 1):.1f}"
print(f"| {n:,} | {label} | {rps:,.0f} | {latency.get('50', '-')} | {latency.get('99', '-')} | {us(orders)} | {us(users)} | {peak} | {failed[1] if failed else 0} |")
PY
}

rows=""
for n in $clients; do
    for _ in $(seq "$rounds"); do
        if [ -n "$before" ]; then
            rows+=$(round "$before" "before" "$n")$'\n'
        fi
        rows+=$(round "$PRISM_BIN" "this build" "$n")$'\n'
    done
done

write_section orders <<MD
## Orders service: \`GET /orders/1\`, its user fetched from the users service

$(machine); release build, SQLite. wrk (2 threads, $(echo $clients | sed 's/ / or /g') connections, ${duration} s after a
2 s warm-up) asks the orders service for one order; for every request the orders service asks
the users service for the order's user. Each round starts both services afresh. CPU is each
process's user + system time over the run divided by the requests served; "peak connections" is
the most connections from the orders service to the users service seen (sampled four times a
second). ${before:+Rounds alternate with an earlier build (\`before\`).}

| clients | build | requests/s | p50 | p99 | orders service CPU µs/request | users service CPU µs/request | peak connections | non-2xx |
|---:|---|---:|---:|---:|---:|---:|---:|---:|
$rows
MD
printf '%s' "$rows"
