#!/usr/bin/env bash
# gRPC throughput: unary `user.UserService/GetUser` on prism against a bare
# tonic service (examples/bare_tonic.rs) in the same run, with h2load
# (Debian's nghttp2-client) sending a pre-encoded gRPC frame.
# Writes its section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client; }
cargo build --release --quiet --bin prism --example bare_tonic
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
duration=${DURATION:-10}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# A gRPC frame: not compressed, 2-byte message, field 1 (id) = 1.
printf '\x00\x00\x00\x00\x02\x08\x01' > "$work/get_user_1.bin"

"$target/release/prism" serve --demo --data-dir "$work/data" --port 18000 --grpc-port 18051 --log-level warn &
"$target/release/examples/bare_tonic" 18052 &
wait_port 18051; wait_port 18052

run() { # port [connections streams] -> "rps mean max ok failed"; h2load reports mean/sd per request
    local args=(-c "${2:-16}" -m "${3:-16}" -t 1 -H 'content-type: application/grpc' -H 'te: trailers' -d "$work/get_user_1.bin")
    h2load "${args[@]}" -D 2 "http://127.0.0.1:$1/user.UserService/GetUser" >/dev/null
    h2load "${args[@]}" -D "$duration" "http://127.0.0.1:$1/user.UserService/GetUser" | awk '
        /^finished in/ {gsub(",", "", $4); rps=$4}
        /^requests:/ {ok=$8; failed=$10}
        /^time for request:/ {mean=$6; max=$5}
        END {print rps, mean, max, ok, failed}'
}
read -r bare_rps bare_mean bare_max bare_ok bare_failed < <(run 18052)
read -r prism_rps prism_mean prism_max prism_ok prism_failed < <(run 18051)
# One client connection with a few calls at a time: what a service calling
# another sees. Small answers written while earlier ones are unacknowledged
# are where a socket without TCP_NODELAY stalls (Nagle meets delayed ACKs).
read -r bare1_rps bare1_mean bare1_max bare1_ok bare1_failed < <(run 18052 1 4)
read -r prism1_rps prism1_mean prism1_max prism1_ok prism1_failed < <(run 18051 1 4)
ratio=$(python3 -c "print(f'{100*$prism_rps/$bare_rps:.0f}')")

write_section grpc <<MD
## gRPC: unary \`GetUser\`

$(machine); h2load, 16 connections × 16 concurrent streams, ${duration}s, release build, SQLite, same run.
Goal: prism ≥ 60% of the bare tonic service's calls/s.

| server | calls/s | mean | max | succeeded | failed |
|---|---:|---:|---:|---:|---:|
| bare tonic \`GetUser\` (fixed reply, no layers) | $bare_rps | $bare_mean | $bare_max | $bare_ok | $bare_failed |
| prism \`user.UserService/GetUser\` | $prism_rps | $prism_mean | $prism_max | $prism_ok | $prism_failed |

prism reaches **$ratio%** of the bare service.

One connection, 4 concurrent streams, ${duration}s:

| server | calls/s | mean | max | succeeded | failed |
|---|---:|---:|---:|---:|---:|
| bare tonic | $bare1_rps | $bare1_mean | $bare1_max | $bare1_ok | $bare1_failed |
| prism | $prism1_rps | $prism1_mean | $prism1_max | $prism1_ok | $prism1_failed |
MD
echo "bare: $bare_rps; prism: $prism_rps; $ratio%"
