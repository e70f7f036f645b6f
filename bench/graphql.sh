#!/usr/bin/env bash
# GraphQL throughput against prism's own REST route in the same run: wrk, 64
# connections, POST /graphql with `{ user(id: 1) { id name email } }` and the
# nested users → posts → comments query, and GET /users/1.
# Writes its section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
cargo build --release --quiet --bin prism
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
duration=${DURATION:-10s}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT

"$target/release/prism" serve --demo --data-dir "$work/data" --port 18000 --grpc-port 18051 --log-level warn &
wait_port 18000

post_script() { # query -> lua file
    local file="$work/$RANDOM.lua"
    python3 - "$1" > "$file" <<'PY'
import json, sys
body = json.dumps({"query": sys.argv[1]})
print('wrk.method = "POST"')
print('wrk.headers["Content-Type"] = "application/json"')
print(f"wrk.body = {json.dumps(body)}")
PY
    echo "$file"
}

run() { # url [lua] -> "rps p50 p99"
    local extra=()
    [ -n "${2:-}" ] && extra=(-s "$2")
    wrk -t2 -c64 -d2s "${extra[@]}" "$1" >/dev/null
    wrk -t2 -c64 -d"$duration" --latency "${extra[@]}" "$1" | awk '
        /Requests\/sec/ {rps=$2}
        /^ +50%/ {p50=$2}
        /^ +99%/ {p99=$2}
        END {print rps, p50, p99}'
}

simple='{ user(id: 1) { id name email } }'
nested='{ users { name posts { title comments { content } } } }'
read -r rest_rps rest_p50 rest_p99 < <(run http://127.0.0.1:18000/users/1)
read -r simple_rps simple_p50 simple_p99 < <(run http://127.0.0.1:18000/graphql "$(post_script "$simple")")
read -r nested_rps nested_p50 nested_p99 < <(run http://127.0.0.1:18000/graphql "$(post_script "$nested")")
pct() { python3 -c "print(f'{100*$1/$2:.0f}')"; }

write_section graphql <<MD
## GraphQL over HTTP

$(machine); wrk, 2 threads, 64 connections, $duration, release build, SQLite with the demo data, same run.
Goal: GraphQL ≥ 50% of prism's own \`GET /users/1\`.

| request | requests/s | p50 | p99 | vs REST |
|---|---:|---:|---:|---:|
| REST \`GET /users/1\` | $rest_rps | $rest_p50 | $rest_p99 | 100% |
| \`$simple\` | $simple_rps | $simple_p50 | $simple_p99 | $(pct "$simple_rps" "$rest_rps")% |
| \`$nested\` | $nested_rps | $nested_p50 | $nested_p99 | $(pct "$nested_rps" "$rest_rps")% |

The nested query runs three SQL statements whatever the number of users,
posts and comments (see \`nested_fields_are_batched\` in \`tests/api/graphql.rs\`).
MD
echo "REST $rest_rps; simple $simple_rps; nested $nested_rps"
