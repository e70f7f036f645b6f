#!/usr/bin/env bash
# The gateway's overhead: `GET /api/users/1` through `prism gateway`, the same
# user straight from the users service, through nginx (Debian's package) as a
# plain reverse proxy to the users service, and through the least proxy the
# gateway's parts make (examples/bare_proxy.rs), in the same run with wrk.
# Writes its section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
# The last phase gives each proxy a core of its own.
[ "$(nproc)" -ge 2 ] || { echo "bench/gateway.sh needs at least two cores" >&2; exit 1; }
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light || apt-get install -y -qq nginx; }
cargo build --release --quiet --bin prism --example bare_proxy
ports_free 18000 18001 18080 18090 18100 18180
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
duration=${DURATION:-5s}
rounds=${ROUNDS:-5}
work=$(mktemp -d)
# Under `set -e` a failing command in the trap would end the script with its
# status: nginx may already have gone with the jobs, and its pid file with it.
trap 'kill $(jobs -p) 2>/dev/null || true; for f in "$work"/nginx*.pid; do if [ -f "$f" ]; then kill "$(cat "$f" 2>/dev/null)" 2>/dev/null || true; fi; done; rm -rf "$work"' EXIT

"$target/release/prism" users-service --demo --data-dir "$work/users" --port 18001 --log-level warn &
users_pid=$!
wait_port 18001
cat > "$work/registry.toml" <<TOML
[services.users]
instances = ["http://127.0.0.1:18001"]
[services.orders]
instances = ["http://127.0.0.1:18002"]
[services.products]
instances = ["http://127.0.0.1:18052"]
TOML
# One worker each for the two proxies: nginx runs one worker process, the
# gateway one runtime thread, so both get the same share of the two cores.
"$target/release/prism" gateway --registry "$work/registry.toml" --data-dir "$work/gateway" --port 18000 \
    --worker-threads 1 --log-level warn &
gateway_pid=$!
wait_port 18000

cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    upstream users { server 127.0.0.1:18001; keepalive 64; }
    server {
        listen 127.0.0.1:18080;
        location /api/users/ {
            proxy_pass http://users/users/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The client's address, as the gateway passes it on.
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work" &
wait_port 18080
"$target/release/examples/bare_proxy" 18090 127.0.0.1:18001 &
bare_pid=$!
wait_port 18090

# CPU seconds (user + system) the processes (pids, space-separated) have used so far.
cpu() {
    local p s=0
    for p in $1; do
        s=$(awk -v hz="$(getconf CLK_TCK)" -v s="$s" '{printf "%.2f", s + ($14 + $15) / hz}' "/proc/$p/stat")
    done
    echo "$s"
}
# wrk's own CPU seconds, from the resource usage of its finished run.
wrk_cpu() { python3 -c 'import resource,subprocess,sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True).stdout
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(out, end=""); print(f"wrk-cpu {r.ru_utime + r.ru_stime:.2f}")' "$@"; }
# url, proxy pid or "" -> "rps p50 p99 us_wrk us_users us_proxy": CPU µs per request per process.
run() {
    local u0 p0=0 p1=0
    u0=$(cpu "$users_pid"); [ -n "$2" ] && p0=$(cpu "$2")
    local out; out=$(wrk_cpu "${wrk_cmd[@]}" -t2 -c64 -d"$duration" --latency "$1")
    local u1; u1=$(cpu "$users_pid"); [ -n "$2" ] && p1=$(cpu "$2")
    awk -v users="$(awk "BEGIN {print $u1 - $u0}")" -v proxy="$(awk "BEGIN {print $p1 - $p0}")" '
        /Requests\/sec/ {rps=$2}
        /^ +50%/ {p50=$2}
        /^ +99%/ {p99=$2}
        /^ +[0-9]+ requests in/ {n=$1}
        /^wrk-cpu/ {w=$2}
        END {printf "%s %s %s %.1f %.1f %.1f\n", rps, p50, p99, 1e6*w/n, 1e6*users/n, 1e6*proxy/n}' <<<"$out"
}
wrk_cmd=(wrk)
# rounds_of OUT URLS PIDS PATH...: every PATH (a key of the arrays named URLS
# and PIDS) measured $rounds times, the paths taking turns round after round:
# the machine's speed drifts by more than the differences measured, and a
# path measured only at a slow moment would look slower. OUT[PATH] gets one
# line of `run` per round.
rounds_of() {
    local -n out=$1 urls=$2 pids=$3
    shift 3
    local p
    for p in "$@"; do "${wrk_cmd[@]}" -t2 -c64 -d2s "${urls[$p]}" >/dev/null; done
    for _ in $(seq "$rounds"); do
        for p in "$@"; do out[$p]+="$(run "${urls[$p]}" "${pids[$p]}")"$'\n'; done
    done
}
# medians PREFIX ROWS PATH...: each PATH's median round from the array named
# ROWS, as PREFIX<PATH>_rps, _p50, _p99, _wrk, _users and _proxy.
medians() {
    local prefix=$1 p
    local -n rows_of=$2
    shift 2
    for p in "$@"; do
        read -r "${prefix}${p}_rps" "${prefix}${p}_p50" "${prefix}${p}_p99" "${prefix}${p}_wrk" \
            "${prefix}${p}_users" "${prefix}${p}_proxy" < <(median <<<"${rows_of[$p]}")
    done
}
# spread A B COLUMN: column COLUMN of the rounds A over the same of B, round
# by round (they ran back to back): "lowest%, median% and highest%".
spread() {
    paste -d' ' <(awk -v c="$3" 'NF {print $c}' <<<"$1") <(awk -v c="$3" 'NF {print $c}' <<<"$2") |
        awk '{printf "%.0f\n", 100 * $1 / $2}' | sort -n |
        awk '{a[++n]=$0} END {printf "%s%%, %s%% and %s%%", a[1], a[int((n+1)/2)], a[n]}'
}
nginx_worker=$(pgrep -P "$(cat "$work/nginx.pid")")
paths=(direct gw ngx bare)
declare -A url=(
    [direct]=http://127.0.0.1:18001/users/1 [gw]=http://127.0.0.1:18000/api/users/1
    [ngx]=http://127.0.0.1:18080/api/users/1 [bare]=http://127.0.0.1:18090/api/users/1
)
declare -A pid=([direct]="" [gw]=$gateway_pid [ngx]=$nginx_worker [bare]=$bare_pid)
declare -A rows=()
rounds_of rows url pid "${paths[@]}"
medians "" rows "${paths[@]}"
# Throughput over nginx's, round by round.
gw_vs_ngx=$(spread "${rows[gw]}" "${rows[ngx]}" 1)
bare_vs_ngx=$(spread "${rows[bare]}" "${rows[ngx]}" 1)
# url -> "p50_us p99_us" with one connection: no queueing, so the difference
# between paths is what the proxy itself adds to a request.
alone() {
    wrk -t1 -c1 -d2s "$1" >/dev/null
    wrk -t1 -c1 -d"$duration" --latency "$1" | awk '
        function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; return v * 1e6 }
        /^ +50%/ {p50=us($2)}
        /^ +99%/ {p99=us($2)}
        END {print p50, p99}'
}
read -r direct_a50 direct_a99 < <(alone http://127.0.0.1:18001/users/1)
read -r gw_a50 gw_a99 < <(alone http://127.0.0.1:18000/api/users/1)
read -r ngx_a50 ngx_a99 < <(alone http://127.0.0.1:18080/api/users/1)
read -r bare_a50 bare_a99 < <(alone http://127.0.0.1:18090/api/users/1)
pct() { python3 -c "print(f'{100*$1/$2:.0f}')"; }
added() { python3 -c "print(f'{$1 - $2:+.0f}')"; }

# Each proxy as it runs by default, a worker per core: the gateway without
# --worker-threads, nginx with `worker_processes auto`.
"$target/release/prism" gateway --registry "$work/registry.toml" --data-dir "$work/gateway-all" --port 18100 \
    --log-level warn &
gateway_all_pid=$!
sed -e 's/^worker_processes 1;/worker_processes auto;/' -e "s#^pid .*#pid $work/nginx-all.pid;#" \
    -e 's/listen 127.0.0.1:18080;/listen 127.0.0.1:18180;/' "$work/nginx.conf" >"$work/nginx-all.conf"
nginx -c "$work/nginx-all.conf" -p "$work" &
wait_port 18100
wait_port 18180
every=(direct gw ngx)
declare -A every_url=(
    [direct]=http://127.0.0.1:18001/users/1 [gw]=http://127.0.0.1:18100/api/users/1
    [ngx]=http://127.0.0.1:18180/api/users/1
)
declare -A every_pid=([direct]="" [gw]=$gateway_all_pid [ngx]="$(pgrep -P "$(cat "$work/nginx-all.pid")" | tr '\n' ' ')")
declare -A all=()
rounds_of all every_url every_pid "${every[@]}"
kill "$gateway_all_pid" "$(cat "$work/nginx-all.pid")"
medians a all "${every[@]}"
gw_all_vs_ngx=$(spread "${all[gw]}" "${all[ngx]}" 1)

# The same paths with each proxy on a core of its own, as on a machine of its
# own: wrk and the users service on CPU 0, the proxy on CPU 1. Every path,
# the direct one included, then has the same CPU for wrk and the service, so
# "vs direct" is what the proxy in between costs them, and the proxy column is
# its CPU per request measured without wrk or the service on its core.
declare -A own=()
taskset -a -p -c 0 "$users_pid" >/dev/null
for p in gw ngx bare; do taskset -a -p -c 1 "${pid[$p]}" >/dev/null; done
wrk_cmd=(taskset -c 0 wrk)
rounds_of own url pid "${paths[@]}"
medians o own "${paths[@]}"
# The proxy's CPU per request (column 6) over nginx's.
gw_cpu_vs_ngx=$(spread "${own[gw]}" "${own[ngx]}" 6)
bare_cpu_vs_ngx=$(spread "${own[bare]}" "${own[ngx]}" 6)

write_section gateway <<MD
## Gateway: \`GET /api/users/1\`

$(machine); wrk, 2 threads, 64 connections, release build, same run: $rounds rounds of
$duration per path, the paths taking turns; each row is its path's median round. nginx
(\`worker_processes 1\`, upstream keepalive) proxies the same route to the same users service;
the gateway runs with one worker thread (\`--worker-threads 1\`) to match. The last row is
\`examples/bare_proxy.rs\`: the gateway's own parts (tokio's single-threaded runtime, hyper's
HTTP/1 server and client connections writing without \`writev\` as the gateway's do, a stack
of idle upstream connections) with nothing else: no request or trace ids, timeouts, retries,
breaker or metrics. It is the floor for a proxy built on this stack. wrk, the users service and the proxy share the machine's two
cores, so the proxied rows also pay for a second process on the same cores.
Goals: the gateway adds under 0.5 ms at p50, keeps ≥ 80% of direct throughput, and is not
slower than nginx.

| path | requests/s | p50 | p99 | vs direct | CPU µs/request: wrk | users service | proxy |
|---|---:|---:|---:|---:|---:|---:|---:|
| users service directly (\`/users/1\`) | $direct_rps | $direct_p50 | $direct_p99 | 100% | $direct_wrk | $direct_users | – |
| \`prism gateway\` (\`/api/users/1\`) | $gw_rps | $gw_p50 | $gw_p99 | $(pct "$gw_rps" "$direct_rps")% | $gw_wrk | $gw_users | $gw_proxy |
| nginx reverse proxy | $ngx_rps | $ngx_p50 | $ngx_p99 | $(pct "$ngx_rps" "$direct_rps")% | $ngx_wrk | $ngx_users | $ngx_proxy |
| bare hyper proxy (floor) | $bare_rps | $bare_p50 | $bare_p99 | $(pct "$bare_rps" "$direct_rps")% | $bare_wrk | $bare_users | $bare_proxy |

Round by round, the gateway's throughput was (lowest, median, highest) $gw_vs_ngx of
nginx's in the same round; the bare proxy's $bare_vs_ngx.

One connection at a time (wrk, 1 thread, 1 connection, $duration): nothing queues, so the
difference to the direct row is what the proxy adds to one request.

| path | p50 µs | p99 µs | added at p50 µs |
|---|---:|---:|---:|
| users service directly | $direct_a50 | $direct_a99 | – |
| \`prism gateway\` | $gw_a50 | $gw_a99 | $(added "$gw_a50" "$direct_a50") |
| nginx reverse proxy | $ngx_a50 | $ngx_a99 | $(added "$ngx_a50" "$direct_a50") |
| bare hyper proxy (floor) | $bare_a50 | $bare_a99 | $(added "$bare_a50" "$direct_a50") |

Each proxy as it runs by default, a worker per core (the gateway without \`--worker-threads\`:
$(nproc) workers, each a thread of its own; nginx with \`worker_processes auto\`), $rounds rounds of
$duration per path, the paths taking turns, median rounds:

| path | requests/s | p50 | p99 | vs direct | CPU µs/request: wrk | users service | proxy |
|---|---:|---:|---:|---:|---:|---:|---:|
| users service directly | $adirect_rps | $adirect_p50 | $adirect_p99 | 100% | $adirect_wrk | $adirect_users | – |
| \`prism gateway\` | $agw_rps | $agw_p50 | $agw_p99 | $(pct "$agw_rps" "$adirect_rps")% | $agw_wrk | $agw_users | $agw_proxy |
| nginx reverse proxy | $angx_rps | $angx_p50 | $angx_p99 | $(pct "$angx_rps" "$adirect_rps")% | $angx_wrk | $angx_users | $angx_proxy |

Round by round, the gateway's throughput was (lowest, median, highest) $gw_all_vs_ngx of nginx's.

With each proxy on a core of its own (\`taskset\`: wrk and the users service on CPU 0, the
proxy on CPU 1, as if on a machine of its own), $rounds rounds of $duration per path, the paths
taking turns, median rounds. The direct row has the same CPU 0 for wrk and the service, so
"vs direct" is what putting the proxy in between costs the path; the proxy column is its CPU
per request with its core to itself.

| path | requests/s | p50 | p99 | vs direct | CPU µs/request: wrk | users service | proxy |
|---|---:|---:|---:|---:|---:|---:|---:|
| users service directly | $odirect_rps | $odirect_p50 | $odirect_p99 | 100% | $odirect_wrk | $odirect_users | – |
| \`prism gateway\` | $ogw_rps | $ogw_p50 | $ogw_p99 | $(pct "$ogw_rps" "$odirect_rps")% | $ogw_wrk | $ogw_users | $ogw_proxy |
| nginx reverse proxy | $ongx_rps | $ongx_p50 | $ongx_p99 | $(pct "$ongx_rps" "$odirect_rps")% | $ongx_wrk | $ongx_users | $ongx_proxy |
| bare hyper proxy (floor) | $obare_rps | $obare_p50 | $obare_p99 | $(pct "$obare_rps" "$odirect_rps")% | $obare_wrk | $obare_users | $obare_proxy |

Round by round, the gateway's CPU per request was (lowest, median, highest) $gw_cpu_vs_ngx of
nginx's; the bare proxy's $bare_cpu_vs_ngx.

Under load (the first table) p50 is mostly queueing: with 64 connections kept busy,
p50 ≈ 64 / throughput, so it follows the throughput.

The CPU columns are each process's user + system time over the measured run divided by the
requests served. Two cores give at most 2,000,000 µs of CPU per second, so a path's ceiling is
2,000,000 / (sum of its columns) requests/s; a proxied request also pays for the proxy's two
extra loopback round trips (four syscalls), which no proxy on the same cores can avoid.
MD
echo "direct $direct_rps; gateway $gw_rps; nginx $ngx_rps; bare $bare_rps; gateway/nginx by round $gw_vs_ngx, bare/nginx $bare_vs_ngx; one connection p50 µs: $direct_a50 / $gw_a50 / $ngx_a50 / $bare_a50"
echo "a worker per core: direct $adirect_rps; gateway $agw_rps ($agw_proxy µs); nginx $angx_rps ($angx_proxy µs); gateway/nginx by round $gw_all_vs_ngx"
echo "own core: direct $odirect_rps; gateway $ogw_rps ($ogw_proxy µs); nginx $ongx_rps ($ongx_proxy µs); bare $obare_rps ($obare_proxy µs); gateway/nginx CPU by round $gw_cpu_vs_ngx"
