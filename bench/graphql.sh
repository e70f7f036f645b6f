#!/usr/bin/env bash
# GraphQL throughput against prism's own REST route in the same run: wrk, 64
# connections, POST /graphql with `{ user(id: 1) { id name email } }`, the same
# with the id as a variable (as client libraries send it), and the nested
# users → posts → comments query, and GET /users/1.
# Writes its section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
cargo build --release --quiet --bin prism
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
duration=${DURATION:-5s}
rounds=${ROUNDS:-5}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

"$target/release/prism" serve --demo --data-dir "$work/data" --port 18000 --grpc-port 18051 --log-level warn &
wait_port 18000

post_script() { # query [variables as JSON] -> lua file
    local file="$work/$RANDOM.lua"
    python3 - "$1" "${2:-}" > "$file" <<'PY'
import json, sys
request = {"query": sys.argv[1]}
if sys.argv[2]:
    request["variables"] = json.loads(sys.argv[2])
body = json.dumps(request)
print('wrk.method = "POST"')
print('wrk.headers["Content-Type"] = "application/json"')
print(f"wrk.body = {json.dumps(body)}")
PY
    echo "$file"
}

run() { # url [lua] [duration] -> "rps p50 p99"
    local extra=()
    [ -n "${2:-}" ] && extra=(-s "$2")
    wrk -t2 -c64 -d"${3:-$duration}" --latency "${extra[@]}" "$1" | awk '
        /Requests\/sec/ {rps=$2}
        /^ +50%/ {p50=$2}
        /^ +99%/ {p99=$2}
        END {print rps, p50, p99}'
}

simple='{ user(id: 1) { id name email } }'
by_variable='query User($id: Int!) { user(id: $id) { id name email } }'
nested='{ users { name posts { title comments { content } } } }'
paths=(rest simple variable nested)
declare -A url=([rest]=http://127.0.0.1:18000/users/1)
declare -A script=(
    [rest]="" [simple]=$(post_script "$simple")
    [variable]=$(post_script "$by_variable" '{"id": 1}') [nested]=$(post_script "$nested")
)
declare -A rows=()
for p in "${paths[@]}"; do run "${url[$p]:-http://127.0.0.1:18000/graphql}" "${script[$p]}" 2s >/dev/null; done
# The requests take turns, round after round, and each row is its request's
# median round: the machine's speed drifts by more than one run can tell.
for _ in $(seq "$rounds"); do
    for p in "${paths[@]}"; do
        rows[$p]+="$(run "${url[$p]:-http://127.0.0.1:18000/graphql}" "${script[$p]}")"$'\n'
    done
done
read -r rest_rps rest_p50 rest_p99 < <(median <<<"${rows[rest]}")
read -r simple_rps simple_p50 simple_p99 < <(median <<<"${rows[simple]}")
read -r var_rps var_p50 var_p99 < <(median <<<"${rows[variable]}")
read -r nested_rps nested_p50 nested_p99 < <(median <<<"${rows[nested]}")
pct() { python3 -c "print(f'{100*$1/$2:.0f}')"; }

write_section graphql <<MD
## GraphQL over HTTP

$(machine); wrk, 2 threads, 64 connections, release build, SQLite with the demo data, same
run: $rounds rounds of $duration per request, the requests taking turns; each row is its
request's median round.
Goal: GraphQL ≥ 50% of prism's own \`GET /users/1\`.

| request | requests/s | p50 | p99 | vs REST |
|---|---:|---:|---:|---:|
| REST \`GET /users/1\` | $rest_rps | $rest_p50 | $rest_p99 | 100% |
| \`$simple\` | $simple_rps | $simple_p50 | $simple_p99 | $(pct "$simple_rps" "$rest_rps")% |
| \`$by_variable\`, \`{"id": 1}\` | $var_rps | $var_p50 | $var_p99 | $(pct "$var_rps" "$rest_rps")% |
| \`$nested\` | $nested_rps | $nested_p50 | $nested_p99 | $(pct "$nested_rps" "$rest_rps")% |

The nested query runs three SQL statements whatever the number of users,
posts and comments (see \`nested_fields_are_batched\` in \`tests/api/graphql.rs\`).
MD
echo "REST $rest_rps; simple $simple_rps; variable $var_rps; nested $nested_rps"
