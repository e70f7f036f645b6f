#!/usr/bin/env bash
# REST throughput: prism's `GET /users/1` against a bare axum JSON handler
# (examples/bare_axum.rs) in the same run, with wrk, 64 connections; and a
# read that goes to the database every time, a page of a user's posts.
# Writes its section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
cargo build --release --quiet --bin prism --example bare_axum
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
duration=${DURATION:-10s}
data=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$data"' EXIT

"$target/release/prism" serve --demo --data-dir "$data" --port 18000 --grpc-port 18051 --log-level warn &
"$target/release/examples/bare_axum" 18001 &
wait_port 18000; wait_port 18001

run() { # url -> "rps p50 p99"
    wrk -t2 -c64 -d2s "$1" >/dev/null # warm-up
    wrk -t2 -c64 -d"$duration" --latency "$1" | awk '
        /Requests\/sec/ {rps=$2}
        /^ +50%/ {p50=$2}
        /^ +99%/ {p99=$2}
        END {print rps, p50, p99}'
}
read -r bare_rps bare_p50 bare_p99 < <(run http://127.0.0.1:18001/users/1)
read -r prism_rps prism_p50 prism_p99 < <(run http://127.0.0.1:18000/users/1)
read -r page_rps page_p50 page_p99 < <(run http://127.0.0.1:18000/users/1/posts)
ratio=$(python3 -c "print(f'{100*$prism_rps/$bare_rps:.0f}')")

write_section rest <<MD
## REST: \`GET /users/1\`

$(machine); wrk, 2 threads, 64 connections, $duration, release build, SQLite, same run.
Goal: prism ≥ 60% of the bare handler's throughput, p99 < 5 ms.

| server | requests/s | p50 | p99 |
|---|---:|---:|---:|
| bare axum handler (no DB, no middleware) | $bare_rps | $bare_p50 | $bare_p99 |
| prism \`GET /users/1\` | $prism_rps | $prism_p50 | $prism_p99 |
| prism \`GET /users/1/posts\` (a page read from SQLite each time) | $page_rps | $page_p50 | $page_p99 |

prism reaches **$ratio%** of the bare handler. A user is served from the read cache; the
last row is the cost of a statement: the page of posts is not cached.
MD
echo "bare: $bare_rps rps (p99 $bare_p99); prism: $prism_rps rps (p99 $prism_p99); $ratio%; a page of posts: $page_rps rps"
