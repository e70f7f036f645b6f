# Shared helpers for the benchmark scripts (sourced, not run).

# Writes stdin into docs/benchmarks.md between <!-- NAME:start --> and
# <!-- NAME:end -->, appending the section when it is not there yet.
write_section() {
    local name=$1 file=docs/benchmarks.md
    python3 -c "$WRITE_SECTION_PY" "$name" "$file"
}

# The section writer; kept in a variable so its standard input stays free for the text.
WRITE_SECTION_PY=$(cat <<'PY'
import sys, pathlib
name, path = sys.argv[1], pathlib.Path(sys.argv[2])
body = sys.stdin.read().rstrip() + "\n"
start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery number here was measured by a script in `bench/`; rerun it to refresh its section.\n"
block = f"{start}\n{body}{end}"
if start in text and end in text:
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    text = before + block + after
else:
    text = text.rstrip() + "\n\n" + block + "\n"
path.write_text(text)
PY
)

machine() {
    echo "$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -srm), $(date -u +%Y-%m-%d)"
}

# Waits until a TCP port answers (at most 30 s).
wait_port() {
    for _ in $(seq 300); do
        (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    return 1
}

# The median of stdin's lines, ordered by their first field.
median() { sort -k1,1n | awk 'NF {a[++n]=$0} END {print a[int((n+1)/2)]}'; }

ensure_wrk() {
    command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
}

ensure_nats() {
    command -v nats-server >/dev/null || { apt-get update -qq && apt-get install -y -qq nats-server; }
}

# Ends the script if something already listens on one of the ports given: it
# would be measured in place of the server meant to be there.
ports_free() {
    local port
    for port in "$@"; do
        if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port $port is taken; stop what listens there first" >&2
            exit 1
        fi
    done
}

# Sets PRISM_BIN to a release build of prism, built now, unless it is set.
release_prism() {
    if [ -z "${PRISM_BIN:-}" ]; then
        cargo build --release --quiet --bin prism
        local target
        target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
        PRISM_BIN=$target/release/prism
    fi
}

# Prints, four times a second while process $1 runs, how many established
# connections go to local port $2. Run it in the background.
count_connections() {
    while kill -0 "$1" 2>/dev/null; do
        ss -Htn state established "( dport = :$2 )" | wc -l
        sleep 0.25
    done
}

# port user password -> that user's bearer token from prism's /auth/login.
login_token() {
    curl -s "localhost:$1/auth/login" -d "username=$2" -d "password=$3" |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["access_token"])'
}

# token file -> a wrk script at file that sends `POST /broadcast` (one event
# each) with the token.
broadcast_lua() {
    post_lua "$1" "$2" "/broadcast?message=hello"
}

# token file path [json-body] -> a wrk script at file that sends `POST path`
# with the token (and the body, as JSON).
post_lua() {
    {
        echo 'wrk.method = "POST"'
        echo "wrk.path = \"$3\""
        if [ -n "${4:-}" ]; then
            echo "wrk.body = '$4'"
            echo 'wrk.headers["Content-Type"] = "application/json"'
        fi
        echo "wrk.headers[\"Authorization\"] = \"Bearer $1\""
    } >"$2"
}
