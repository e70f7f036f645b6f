#!/usr/bin/env bash
# The embedded SQLite store, with wrk. Reads: routes that read SQLite at
# every request (no cache in front), 64 clients. Writes: `POST /broadcast`
# (one event in the log), `POST /posts` (a post and its event),
# `PATCH /posts/{id}` (a new title for one of the first 1,000 posts, at
# random, and its event) and `POST /posts, 1 in 100 refused` (the same, but
# every hundredth request a comment that the database refuses after it drew
# an event id), from 2, 32 and 256 clients at once. SQLite syncs its log to
# disk at each commit (`synchronous=FULL`); the writers that queue share one
# commit, so the commits per write (from /metrics) show how many shared.
# BASELINE=/path/to/an/older/prism measures that build too, the two taking
# turns round by round. PG_URL=postgres://user@host/db (a database to create
# others from) measures the reads and writes on PostgreSQL too, in a database
# of their own made afresh each round; its writes per commit are requests per
# WAL sync (`pg_stat_wal`, server-wide: nothing else should write meanwhile).
# ONLY=writes skips the reads, ONLY=reads the writes (each leaving the other's
# section as it is).
# Writes its sections of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ensure_wrk
release_prism
duration=${DURATION:-4s}
rounds=${ROUNDS:-3}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
port=18600
ports_free "$port"

metric() { # name -> value from prism's /metrics, or "-"
    curl -s "localhost:$port/metrics" | awk -v m="prism_$1" '$1 == m {v=$2} END {print (v == "" ? "-" : v)}'
}

# bin [database url] -> starts prism (a fresh database) and writes the wrk scripts.
start() {
    rm -rf "$work/data"
    local db=()
    [ -n "${2:-}" ] && db=(--database-url "$2")
    PRISM_ADMIN_PASSWORD=bench-admin-password "$1" serve --demo --data-dir "$work/data" "${db[@]}" \
        --port "$port" --grpc-port 0 --log-level error &
    prism_pid=$!
    wait_port "$port"
    local token
    token=$(login_token "$port" admin bench-admin-password)
    broadcast_lua "$token" "$work/broadcast.lua"
    post_lua "$token" "$work/posts.lua" /posts '{"title":"t","content":"c","author_id":1}'
    patch_lua "$token" "$work/patch.lua"
    rollbacks_lua "$token" "$work/rollbacks.lua"
}

# token file -> a wrk script at file that sends what `POST /posts` sends, but
# every hundredth request a comment by a user that does not exist: refused
# (404) by the foreign key at the end of its statement, after it drew an event
# id, so on PostgreSQL it leaves a gap in the log for the pump to settle.
rollbacks_lua() {
    cat >"$2" <<EOF
local n = 0
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $1"}
function request()
    n = n + 1
    if n % 100 == 0 then
        return wrk.format("POST", "/posts/1/comments", headers, '{"content":"c","user_id":2000000000}')
    end
    return wrk.format("POST", "/posts", headers, '{"title":"t","content":"c","author_id":1}')
end
EOF
}

# token file -> a wrk script at file that renames a post at random among the
# first 1,000 (the `POST /posts` rows, measured first, wrote them), each time
# to a title not given before, so every request is a change.
patch_lua() {
    cat >"$2" <<EOF
local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("seed", threads)
end
function init()
    math.randomseed(seed)
end
local n = 0
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $1"}
function request()
    n = n + 1
    return wrk.format("PATCH", "/posts/" .. math.random(1, 1000), headers,
        '{"title":"t' .. seed .. '-' .. n .. '"}')
end
EOF
}

stop() { kill "$prism_pid"; wait "$prism_pid" 2>/dev/null || true; }

# path -> "rps p50 p99 non2xx"
read_load() {
    wrk -t2 -c64 -d"$duration" --latency "http://127.0.0.1:$port$1" | awk '
        /Requests\/sec/ {rps=$2}
        /^ +50%/ {p50=$2}
        /^ +99%/ {p99=$2}
        /Non-2xx/ {bad=$NF}
        END {printf "%s %s %s %d\n", rps, p50, p99, bad}'
}

wal_syncs() { psql "$PG_URL" -Atc "SELECT wal_sync FROM pg_stat_wal"; }

# write connections [pg] -> "rps p50 p99 non2xx writes_per_commit"
load() {
    local w0 c0 w1 c1 out
    if [ -n "${3:-}" ]; then
        w0=0; c0=$(wal_syncs)
    else
        w0=$(metric sqlite_writes_total); c0=$(metric sqlite_commits_total)
    fi
    out=$(wrk -t2 -c"$2" -d"$duration" --latency -s "$work/$1.lua" "http://127.0.0.1:$port")
    if [ -n "${3:-}" ]; then
        w1=$(awk '/requests in/ {print $1}' <<<"$out"); c1=$(wal_syncs)
    else
        w1=$(metric sqlite_writes_total); c1=$(metric sqlite_commits_total)
    fi
    awk -v w0="$w0" -v w1="$w1" -v c0="$c0" -v c1="$c1" '
        /Requests\/sec/ {rps=$2}
        /^ +50%/ {p50=$2}
        /^ +99%/ {p99=$2}
        /Non-2xx/ {bad=$NF}
        END {
            per = (w0 == "-" || c1 == c0) ? "–" : sprintf("%.1f", (w1 - w0) / (c1 - c0))
            printf "%s %s %s %d %s\n", rps, p50, p99, bad, per
        }' <<<"$out"
}

builds=(current)
declare -A bin=([current]=$PRISM_BIN)
if [ -n "${BASELINE:-}" ]; then
    builds=(baseline current)
    bin[baseline]=$BASELINE
fi
# The last: GraphQL's nested users -> posts -> comments, three batch reads.
reads=(/users/1/posts "/users/?limit=10" /posts/1/comments /messages
    "/graphql?query=%7Busers%7Bname%20posts%7Btitle%20comments%7Bcontent%7D%7D%7D%7D")
declare -A rows=()
writes=(broadcast posts patch rollbacks)
declare -A write_name=([broadcast]='POST /broadcast' [posts]='POST /posts' [patch]='PATCH /posts/{id}'
    [rollbacks]='POST /posts, 1 in 100 refused')

# build database [database url] -> one round of every read and write, into rows.
measure() {
    local pg=
    [ "$2" = pg ] && pg=pg
    start "${bin[$1]}" "${3:-}"
    if [ "${ONLY:-}" != writes ]; then
        wrk -t2 -c64 -d1s "http://127.0.0.1:$port/users/1/posts" >/dev/null
        for path in "${reads[@]}"; do
            rows[$1/$2/$path]+="$(read_load "$path")"$'\n'
        done
    fi
    if [ "${ONLY:-}" != reads ]; then
        for write in "${writes[@]}"; do
            for c in 2 32 256; do
                rows[$1/$2/$write/$c]+="$(load "$write" "$c" $pg)"$'\n'
            done
        done
    fi
    stop
}

for _ in $(seq "$rounds"); do
    for b in "${builds[@]}"; do
        measure "$b" sqlite
        if [ -n "${PG_URL:-}" ]; then
            psql "$PG_URL" -qc "DROP DATABASE IF EXISTS prism_bench WITH (FORCE)" -c "CREATE DATABASE prism_bench"
            measure "$b" pg "${PG_URL%/*}/prism_bench"
        fi
    done
done
[ -n "${PG_URL:-}" ] && psql "$PG_URL" -qc "DROP DATABASE IF EXISTS prism_bench WITH (FORCE)"
databases=(sqlite)
[ -n "${PG_URL:-}" ] && databases+=(pg)

[ "${ONLY:-}" = writes ] || {
    echo "## Store reads"
    echo
    echo "$(machine); wrk, 2 threads, 64 connections, $duration per row, release build; each row is"
    echo "the median of $rounds rounds, the builds taking turns. Each request reads the database"
    echo "(these routes have no cache in front); PostgreSQL is the machine's own server, over TCP."
    echo
    echo "| build | database | route | requests/s | p50 | p99 | non-2xx |"
    echo "|---|---|---|---:|---:|---:|---:|"
    for d in "${databases[@]}"; do
        for b in "${builds[@]}"; do
            for path in "${reads[@]}"; do
                read -r rps p50 p99 bad < <(median <<<"${rows[$b/$d/$path]}")
                name=SQLite
                [ "$d" = pg ] && name=PostgreSQL
                route="GET $path"
                [[ $path == /graphql* ]] && route='GraphQL { users { name posts { title comments { content } } } }'
                echo "| $b | $name | \`$route\` | $rps | $p50 | $p99 | $bad |"
            done
        done
    done
} | write_section store-reads
[ "${ONLY:-}" = reads ] || {
    echo "## Store writes"
    echo
    echo "$(machine); wrk, 2 threads, $duration per row, release build, a fresh database each"
    echo "round; each row is the median of $rounds rounds. \`POST /broadcast\` appends one event to"
    echo "the log, \`POST /posts\` stores a post and its event, \`PATCH /posts/{id}\` gives one of the"
    echo "first 1,000 posts (at random) a new title and writes its event; \`POST /posts, 1 in 100"
    echo "refused\` is \`POST /posts\` with every hundredth request a comment by a user that does not"
    echo "exist, which PostgreSQL refuses after it drew an event id (a gap the pump settles; the"
    echo "refusals are the non-2xx). Every answer is sent after the commit that made the write"
    echo "durable (SQLite \`synchronous=FULL\`, PostgreSQL"
    echo "\`synchronous_commit=on\`: the log synced to disk). Writes per commit: on SQLite how many"
    echo "queued writers shared one commit (from \`/metrics\`), on PostgreSQL requests per WAL sync"
    echo "(\`pg_stat_wal\`)."
    echo
    echo "| build | database | write | clients | writes/s | p50 | p99 | non-2xx | writes per commit |"
    echo "|---|---|---|---:|---:|---:|---:|---:|---:|"
    for d in "${databases[@]}"; do
        for b in "${builds[@]}"; do
            for write in "${writes[@]}"; do
                for c in 2 32 256; do
                    name=SQLite
                    [ "$d" = pg ] && name=PostgreSQL
                    read -r rps p50 p99 bad per < <(median <<<"${rows[$b/$d/$write/$c]}")
                    echo "| $b | $name | \`${write_name[$write]}\` | $c | $rps | $p50 | $p99 | $bad | $per |"
                done
            done
        done
    done
} | write_section writes
sed -n '/<!-- store-reads:start -->/,/<!-- store-reads:end -->/p;/<!-- writes:start -->/,/<!-- writes:end -->/p' docs/benchmarks.md
