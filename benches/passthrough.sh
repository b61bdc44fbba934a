#!/usr/bin/env bash
# Pass-through benchmark: pgbench select-only through nothing (direct), pgbouncer (session mode)
# and pgenvelope, all against one private PostgreSQL cluster started by this script.
#
# Not a test: it measures. Runs are interleaved over the targets and repeated ROUNDS times; the
# table reports medians. CPU of the proxies is read from /proc/PID/stat around each run.
#
# Usage: benches/passthrough.sh            (from anywhere; needs PostgreSQL 15 and pgbouncer)
#
# Environment (all optional):
#   DURATION=10          seconds per pgbench run
#   ROUNDS=3             repetitions of the whole matrix
#   CLIENTS="1 8 64"     pgbench -c values
#   MODES="simple prepared"   pgbench -M values
#   JOBS                 pgbench -j (default: min(clients, number of CPUs))
#   SCALE=10             pgbench -i -s
#   TARGETS="direct pgbouncer pgenvelope pgenvelope-rules"
#   PGENVELOPE_BIN       proxy binary (default: cargo build --release, then
#                        $CARGO_TARGET_DIR/release/pgenvelope)
#   PGENVELOPE_NO_BUILD=1     do not run cargo build; skip pgenvelope if the binary is missing
#   BENCH_PROXY_STANDIN=pgbouncer  measure a second pgbouncer in pgenvelope's place (to test
#                        this script before the proxy exists)
#   PGENVELOPE_PG_BINDIR PostgreSQL server binaries (default /usr/lib/postgresql/15/bin)
#   RESULTS_DIR          where the CSV goes (default benches/results)
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-"1 8 64"}
MODES=${MODES:-"simple prepared"}
SCALE=${SCALE:-10}
TARGETS=${TARGETS:-"direct pgbouncer pgenvelope pgenvelope-rules"}
RESULTS_DIR=${RESULTS_DIR:-$REPO_DIR/benches/results}
NCPU=$(nproc)
CLK_TCK=$(getconf CLK_TCK)
DB=bench
DB_USER=postgres

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

find_pg_bindir() {
    if [ -n "${PGENVELOPE_PG_BINDIR:-}" ]; then echo "$PGENVELOPE_PG_BINDIR"; return; fi
    if [ -x /usr/lib/postgresql/15/bin/initdb ]; then echo /usr/lib/postgresql/15/bin; return; fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir; return
    fi
    d=$(command -v initdb || true)
    [ -n "$d" ] || die "PostgreSQL server binaries not found (set PGENVELOPE_PG_BINDIR)"
    dirname "$d"
}
PG_BINDIR=$(find_pg_bindir)
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$PGBOUNCER" ] || PGBOUNCER=""

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# PostgreSQL and pgbouncer refuse to run as root: drop to the postgres user with setpriv, which
# execs in place, so $! is the server's own PID and signals reach it directly.
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no postgres user"
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups)
else
    AS_PG=()
fi

# ---------------------------------------------------------------------------------------------
# Processes we start, stopped by PID on any exit.
PG_PID="" ; BOUNCER_PID="" ; PROXY_PID="" ; PROXY2_PID=""
WORK=$(mktemp -d /tmp/pgenv-bench.XXXXXX)

stop_pid() { # pid signal timeout_s
    local pid=$1 sig=$2 t=$3
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((t * 10))); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid did not stop on SIG$sig, killing"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$PROXY_PID" TERM 10
    stop_pid "$PROXY2_PID" TERM 10
    stop_pid "$BOUNCER_PID" INT 10
    stop_pid "$PG_PID" INT 30
    wait 2>/dev/null || true
    if [ "$rc" != 0 ] && [ -d "$WORK" ]; then
        for f in "$WORK"/*.log; do
            [ -f "$f" ] || continue
            log "--- last lines of $f"; tail -n 20 "$f" >&2 || true
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_ready() { # port name pid
    local port=$1 name=$2 pid=$3
    for _ in $(seq 1 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) exited during start"; return 1
        fi
        if "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" -d "$DB" -U "$DB_USER" >/dev/null 2>&1 \
            && "$PG_BINDIR/psql" -X -qAt -h 127.0.0.1 -p "$port" -U "$DB_USER" -d "$DB" \
                -c 'SELECT 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    log "$name did not accept connections on port $port"; return 1
}

cpu_ticks() { # pid -> utime+stime in clock ticks (fields 14 and 15 of /proc/PID/stat)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    stat=${stat##*) } # the command name may contain spaces; fields after it are fixed
    # shellcheck disable=SC2086
    set -- $stat
    echo $(( ${12} + ${13} ))
}

# ---------------------------------------------------------------------------------------------
[ -n "$PGBOUNCER" ] || log "WARNING: pgbouncer not found: the pgbouncer target is skipped"
[ "$(id -u)" != 0 ] || chown postgres: "$WORK"

log "PostgreSQL binaries: $PG_BINDIR"
PG_PORT=$(free_port)
"${AS_PG[@]}" "$PG_BINDIR/initdb" -D "$WORK/data" -U "$DB_USER" -A trust -E UTF8 --locale=C \
    --no-sync >"$WORK/initdb.log" 2>&1 || die "initdb failed: $(cat "$WORK/initdb.log")"
mkdir -p "$WORK/sock"
[ "$(id -u)" != 0 ] || chown postgres: "$WORK/sock"
cat >>"$WORK/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK/sock'
max_connections = 300
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
EOF
"${AS_PG[@]}" "$PG_BINDIR/postgres" -D "$WORK/data" -p "$PG_PORT" >"$WORK/postgres.log" 2>&1 &
PG_PID=$!
DB="postgres" wait_ready "$PG_PORT" postgres "$PG_PID" || die "postgres did not start"
"$PG_BINDIR/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" "$DB"
log "postgres pid $PG_PID on port $PG_PORT; pgbench -i -s $SCALE"
"$PG_BINDIR/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" "$DB" \
    >"$WORK/pgbench-init.log" 2>&1 || die "pgbench -i failed: $(tail -n 5 "$WORK/pgbench-init.log")"

start_pgbouncer() { # name -> sets STARTED_PID, STARTED_PORT
    local name=$1 port
    port=$(free_port)
    printf '"%s" ""\n' "$DB_USER" >"$WORK/$name-users.txt"
    cat >"$WORK/$name.ini" <<EOF
[databases]
$DB = host=127.0.0.1 port=$PG_PORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $WORK/$name-users.txt
pool_mode = session
max_client_conn = 300
default_pool_size = 100
max_db_connections = 0
ignore_startup_parameters = extra_float_digits,options
logfile = $WORK/$name.log
EOF
    [ "$(id -u)" != 0 ] || chown postgres: "$WORK/$name.ini" "$WORK/$name-users.txt"
    "${AS_PG[@]}" "$PGBOUNCER" "$WORK/$name.ini" >>"$WORK/$name.out.log" 2>&1 &
    STARTED_PID=$!
    STARTED_PORT=$port
    wait_ready "$port" "$name" "$STARTED_PID"
}

declare -A PORT PID_OF
PORT[direct]=$PG_PORT
ACTIVE=()
for target in $TARGETS; do
    case $target in
    direct) ACTIVE+=(direct) ;;
    pgbouncer)
        if [ -z "$PGBOUNCER" ]; then continue; fi
        start_pgbouncer pgbouncer || die "pgbouncer did not start"
        BOUNCER_PID=$STARTED_PID
        PORT[pgbouncer]=$STARTED_PORT; PID_OF[pgbouncer]=$STARTED_PID
        log "pgbouncer pid $BOUNCER_PID on port ${PORT[pgbouncer]}"
        ACTIVE+=(pgbouncer) ;;
    pgenvelope|pgenvelope-rules)
        if [ "${BENCH_PROXY_STANDIN:-}" = pgbouncer ] && [ "$target" = pgenvelope ]; then
            [ -n "$PGBOUNCER" ] || die "BENCH_PROXY_STANDIN=pgbouncer but pgbouncer is missing"
            log "WARNING: measuring a second pgbouncer in place of pgenvelope (BENCH_PROXY_STANDIN)"
            start_pgbouncer standin || die "stand-in pgbouncer did not start"
            PROXY_PID=$STARTED_PID
            PORT[pgenvelope]=$STARTED_PORT; PID_OF[pgenvelope]=$STARTED_PID
            ACTIVE+=(pgenvelope)
            continue
        fi
        bin=${PGENVELOPE_BIN:-}
        if [ -z "$bin" ]; then
            target_dir=${CARGO_TARGET_DIR:-$REPO_DIR/target}
            if [ "${PGENVELOPE_NO_BUILD:-}" != 1 ]; then
                log "cargo build --release --bin pgenvelope"
                (cd "$REPO_DIR" && cargo build --release --locked --bin pgenvelope) >&2 \
                    || die "cargo build --release failed"
            fi
            bin=$target_dir/release/pgenvelope
        fi
        if [ ! -x "$bin" ]; then
            log "WARNING: $bin not found: the pgenvelope target is skipped"
            continue
        fi
        port=$(free_port)
        # `pgenvelope`: no rules, a pure relay. `pgenvelope-rules`: the encrypting engine is
        # on (rules for a table pgbench never touches), so every statement goes through the
        # pre-check and every result through the read path: the cost users pay for traffic
        # that touches no encrypted column.
        mkdir -p "$WORK/$target-rules"
        if [ "$target" = pgenvelope-rules ]; then
            printf '[[table]]\nname = "public.vault_secrets"\ntenant_column = "org_id"\nencrypt = ["value"]\n' \
                >"$WORK/$target-rules/vault.toml"
        fi
        RUST_LOG=${RUST_LOG:-info} "$bin" serve --listen "127.0.0.1:$port" \
            --upstream "postgres://$DB_USER@127.0.0.1:$PG_PORT/$DB" --rules "$WORK/$target-rules" \
            --kms "local:$WORK/$target-kek" >"$WORK/$target.log" 2>&1 &
        pid=$!
        [ "$target" = pgenvelope ] && PROXY_PID=$pid || PROXY2_PID=$pid
        if ! wait_ready "$port" "$target" "$pid"; then
            log "WARNING: $target did not serve on port $port: the target is skipped"
            tail -n 20 "$WORK/$target.log" >&2 || true
            stop_pid "$pid" TERM 5
            continue
        fi
        PORT[$target]=$port; PID_OF[$target]=$pid
        log "$target pid $pid on port $port ($bin)"
        ACTIVE+=("$target") ;;
    *) die "unknown target $target" ;;
    esac
done
[ ${#ACTIVE[@]} -gt 0 ] || die "no target to measure"

RAW="$WORK/raw.csv"
echo "round,target,mode,clients,tps,latency_ms,statements,cpu_ms" >"$RAW"
total=$(( ROUNDS * $(wc -w <<<"$MODES") * $(wc -w <<<"$CLIENTS") * ${#ACTIVE[@]} ))
log "$total runs of ${DURATION}s: targets ${ACTIVE[*]}; modes $MODES; clients $CLIENTS; rounds $ROUNDS"
n=0
for round in $(seq 1 "$ROUNDS"); do
    for mode in $MODES; do
        for c in $CLIENTS; do
            j=${JOBS:-$(( c < NCPU ? c : NCPU ))}
            for target in "${ACTIVE[@]}"; do
                n=$((n + 1))
                pid=${PID_OF[$target]:-}
                before=0; [ -z "$pid" ] || before=$(cpu_ticks "$pid")
                out=$("$PG_BINDIR/pgbench" -n -S -T "$DURATION" -c "$c" -j "$j" -M "$mode" \
                    -h 127.0.0.1 -p "${PORT[$target]}" -U "$DB_USER" "$DB" 2>&1) \
                    || die "pgbench failed on $target ($mode, $c clients): $out"
                cpu_ms=""
                if [ -n "$pid" ]; then
                    after=$(cpu_ticks "$pid")
                    cpu_ms=$(( (after - before) * 1000 / CLK_TCK ))
                fi
                tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -n1)
                lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out" | head -n1)
                stmts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
                [ -n "$tps" ] && [ -n "$lat" ] && [ -n "$stmts" ] \
                    || die "could not parse pgbench output for $target: $out"
                echo "$round,$target,$mode,$c,$tps,$lat,$stmts,$cpu_ms" >>"$RAW"
                log "[$n/$total] round $round $target $mode c=$c: tps=$tps lat=${lat}ms${cpu_ms:+ cpu=${cpu_ms}ms}"
            done
        done
    done
done

mkdir -p "$RESULTS_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
CSV="$RESULTS_DIR/passthrough-$STAMP.csv"
cp "$RAW" "$RESULTS_DIR/passthrough-$STAMP-raw.csv"
python3 - "$RAW" "$CSV" <<'EOF'
import csv, statistics, sys
from collections import defaultdict

raw, out = sys.argv[1], sys.argv[2]
runs = defaultdict(list)
order = []
for r in csv.DictReader(open(raw)):
    key = (r["target"], r["mode"], int(r["clients"]))
    if key not in runs:
        order.append(key)
    runs[key].append(r)

def med(rows, field):
    return statistics.median(float(r[field]) for r in rows)

summary = {}
for key in order:
    rows = runs[key]
    cpu = None
    if all(r["cpu_ms"] for r in rows):
        stmts = sum(int(r["statements"]) for r in rows)
        cpu = sum(float(r["cpu_ms"]) for r in rows) / (stmts / 1000) if stmts else None
    summary[key] = dict(tps=med(rows, "tps"), lat=med(rows, "latency_ms"), cpu=cpu, n=len(rows))

def ratio(key, base):
    b = summary.get((base, key[1], key[2]))
    return summary[key]["tps"] / b["tps"] if b and b["tps"] else None

fmt = lambda v, spec: "" if v is None else format(v, spec)
mode_rank = {}
for k in order:
    mode_rank.setdefault(k[1], len(mode_rank))
target_rank = {"direct": 0, "pgbouncer": 1, "pgenvelope": 2, "pgenvelope-rules": 3}
order.sort(key=lambda k: (mode_rank[k[1]], k[2], target_rank.get(k[0], 9)))
header = ["target", "mode", "clients", "median_tps", "avg_latency_ms", "ratio_vs_direct",
          "ratio_vs_pgbouncer", "cpu_ms_per_1k_stmts", "rounds"]
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for k in order:
        s = summary[k]
        w.writerow([k[0], k[1], k[2], f"{s['tps']:.1f}", f"{s['lat']:.3f}",
                    fmt(ratio(k, "direct"), ".3f"), fmt(ratio(k, "pgbouncer"), ".3f"),
                    fmt(s["cpu"], ".2f"), s["n"]])

print(f"{'target':<11} {'mode':<9} {'clients':>7} {'median TPS':>11} {'avg lat ms':>10} "
      f"{'vs direct':>9} {'vs pgbouncer':>12} {'CPU ms/1k stmts':>15}")
prev = None
for k in order:
    if prev is not None and prev != (k[1], k[2]):
        print()
    prev = (k[1], k[2])
    s = summary[k]
    print(f"{k[0]:<11} {k[1]:<9} {k[2]:>7} {s['tps']:>11.1f} {s['lat']:>10.3f} "
          f"{fmt(ratio(k, 'direct'), '.3f'):>9} {fmt(ratio(k, 'pgbouncer'), '.3f'):>12} "
          f"{fmt(s['cpu'], '.2f'):>15}")
EOF
echo
echo "median of $ROUNDS rounds of ${DURATION}s each; CPU = proxy process user+system time"
echo "results: $CSV (raw runs: ${CSV%.csv}-raw.csv)"
