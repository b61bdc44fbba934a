#!/usr/bin/env bash
# Encrypted-workload benchmark: inserts and point-selects of rows with two encrypted text
# columns (64 B and 1 KiB values) through pgenvelope, against the same statements on a table
# with no rules through the same pgenvelope, and directly against PostgreSQL, in one run.
#
# Not a test: it measures. Runs are interleaved and repeated ROUNDS times; medians reported.
# Uses its own private PostgreSQL cluster (fsync off) and a pgenvelope with a fresh local KEK.
# pgbench runs in prepared mode (values travel as Bind parameters, as with most drivers).
#
# Usage: benches/encrypted.sh
# Environment: DURATION=10 ROUNDS=3 CLIENTS="1 8" ROWS=20000 PGENVELOPE_BIN=…
#              PGENVELOPE_NO_BUILD=1 PGENVELOPE_PG_BINDIR=… RESULTS_DIR=benches/results
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-"1 8"}
ROWS=${ROWS:-20000}
RESULTS_DIR=${RESULTS_DIR:-$REPO_DIR/benches/results}
PG_BINDIR=${PGENVELOPE_PG_BINDIR:-/usr/lib/postgresql/15/bin}
log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ -z "${PGENVELOPE_BIN:-}" ]; then
    TARGET_DIR=${CARGO_TARGET_DIR:-$(cd "$REPO_DIR" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}
    PGENVELOPE_BIN=$TARGET_DIR/release/pgenvelope
    if [ "${PGENVELOPE_NO_BUILD:-}" != 1 ]; then
        (cd "$REPO_DIR" && cargo build --release --locked --bin pgenvelope) >&2
    fi
fi
[ -x "$PGENVELOPE_BIN" ] || die "no pgenvelope binary at $PGENVELOPE_BIN"

if [ "$(id -u)" = 0 ]; then AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups); else AS_PG=(); fi
WORK=$(mktemp -d /tmp/pgenv-encbench.XXXXXX)
[ -n "$WORK" ] && [ -d "$WORK" ] || die "no work directory"
PG_PID="" ; PROXY_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in $PROXY_PID $PG_PID; do
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [ "$rc" = 0 ] || { tail -n 20 "$WORK"/*.log >&2 || true; }
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
[ "$(id -u)" != 0 ] || chown postgres: "$WORK"

PG_PORT=$(free_port)
"${AS_PG[@]}" "$PG_BINDIR/initdb" -D "$WORK/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$WORK/initdb.log" 2>&1
mkdir -p "$WORK/sock"
[ "$(id -u)" != 0 ] || chown postgres: "$WORK/sock"
{
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$WORK/sock'"
    echo "max_connections = 200"
    echo "shared_buffers = 256MB"
    echo "fsync = off"
    echo "synchronous_commit = off"
    echo "full_page_writes = off"
} >>"$WORK/data/postgresql.conf"
"${AS_PG[@]}" "$PG_BINDIR/postgres" -D "$WORK/data" -p "$PG_PORT" >"$WORK/postgres.log" 2>&1 &
PG_PID=$!
for _ in $(seq 1 100); do "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.1; done
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d postgres)
"${PSQL[@]}" -p "$PG_PORT" -c "
  CREATE TABLE bench_enc (id bigserial primary key, org_id text not null, a text, b text);
  CREATE TABLE bench_plain (id bigserial primary key, org_id text not null, a text, b text);"

mkdir -p "$WORK/rules"
printf '[[table]]\nname = "public.bench_enc"\ntenant_column = "org_id"\nencrypt = ["a", "b"]\n' >"$WORK/rules/bench.toml"
PROXY_PORT=$(free_port)
(cd "$WORK" && exec "$PGENVELOPE_BIN" serve --listen "127.0.0.1:$PROXY_PORT" \
    --upstream "postgres://postgres@127.0.0.1:$PG_PORT/postgres" --rules "$WORK/rules" \
    --kms "local:$WORK/kek" --log warn) >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
for _ in $(seq 1 100); do "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PROXY_PORT" && break; sleep 0.1; done

V64=$(python3 -c 'print("x" * 64)')
V1K=$(python3 -c 'print("y" * 1024)')
log "loading $ROWS rows into each table (the encrypted one through the proxy)"
printf '%s\n' '\set org random(0, 9)' \
    'INSERT INTO bench_enc (org_id, a, b) VALUES (:org, :v64, :v1k);' >"$WORK/load.sql"
"$PG_BINDIR/pgbench" -n -M prepared -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -c 4 -j 2 \
    -t $((ROWS / 4)) -D v64="$V64" -D v1k="$V1K" -f "$WORK/load.sql" postgres >"$WORK/load.log" 2>&1 \
    || die "loading through the proxy failed"
"${PSQL[@]}" -p "$PG_PORT" -c "INSERT INTO bench_plain (org_id, a, b)
    SELECT (g % 10)::text, repeat('x', 64), repeat('y', 1024) FROM generate_series(1, $ROWS) g"
"${PSQL[@]}" -p "$PG_PORT" -c "VACUUM ANALYZE"

for t in enc plain; do
    printf '%s\n' '\set org random(0, 9)' \
        "INSERT INTO bench_$t (org_id, a, b) VALUES (:org, :v64, :v1k);" >"$WORK/insert_$t.sql"
    printf '%s\n' "\\set id random(1, $ROWS)" \
        "SELECT a, b FROM bench_$t WHERE id = :id;" >"$WORK/select_$t.sql"
done

cpu_ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} ))
}

mkdir -p "$RESULTS_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW=$RESULTS_DIR/encrypted-$STAMP-raw.csv
echo "round,workload,target,clients,tps,latency_ms,proxy_cpu_ms_per_1k" >"$RAW"
run() { # workload target clients
    local w=$1 target=$2 c=$3 port table out tps lat t0 t1 n cpu
    case $target in
        direct) port=$PG_PORT; table=plain ;;
        proxy-plain) port=$PROXY_PORT; table=plain ;;
        proxy-encrypted) port=$PROXY_PORT; table=enc ;;
    esac
    t0=$(cpu_ticks "$PROXY_PID")
    out=$("$PG_BINDIR/pgbench" -n -M prepared -h 127.0.0.1 -p "$port" -U postgres -c "$c" \
        -j "$(( c < 2 ? c : 2 ))" -T "$DURATION" -D v64="$V64" -D v1k="$V1K" \
        -f "$WORK/${w}_$table.sql" postgres 2>&1) || { log "pgbench failed: $out"; return 1; }
    t1=$(cpu_ticks "$PROXY_PID")
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
    n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    if [ "$target" = direct ] || [ "${n:-0}" = 0 ]; then
        cpu=""
    else
        cpu=$(python3 -c "print(round(($t1-$t0)*1000/$(getconf CLK_TCK)/$n*1000, 3))")
    fi
    echo "$ROUND,$w,$target,$c,$tps,$lat,$cpu" >>"$RAW"
    log "round $ROUND $w $target c=$c: $tps tps, $lat ms, proxy cpu ${cpu:--} ms/1k"
}
for ROUND in $(seq 1 "$ROUNDS"); do
    for w in select insert; do
        for c in $CLIENTS; do
            for target in direct proxy-plain proxy-encrypted; do run "$w" "$target" "$c"; done
        done
    done
done

python3 - "$RAW" "$RESULTS_DIR/encrypted-$STAMP.csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
keys = sorted({(r["workload"], int(r["clients"])) for r in rows})
groups = {}
for r in rows:
    groups.setdefault((r["workload"], int(r["clients"]), r["target"]), []).append(r)
out = csv.writer(open(sys.argv[2], "w"))
out.writerow(["workload", "clients", "target", "tps", "latency_ms", "proxy_cpu_ms_per_1k",
              "ratio_vs_proxy_plain", "ratio_vs_direct"])
fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"
print(f"{'workload':8} {'clients':>7} {'target':16} {'tps':>10} {'lat ms':>8} {'cpu/1k':>8} {'vs plain':>9} {'vs direct':>9}")
for w, c in keys:
    def m(t, f):
        vals = [float(r[f]) for r in groups.get((w, c, t), []) if r[f]]
        return statistics.median(vals) if vals else None
    for t in ["direct", "proxy-plain", "proxy-encrypted"]:
        tps, lat, cpu = m(t, "tps"), m(t, "latency_ms"), m(t, "proxy_cpu_ms_per_1k")
        plain, direct = m("proxy-plain", "tps"), m("direct", "tps")
        rp = tps / plain if tps and plain else None
        rd = tps / direct if tps and direct else None
        out.writerow([w, c, t, tps, lat, cpu, rp, rd])
        print(f"{w:8} {c:>7} {t:16} {fmt(tps, 0):>10} {fmt(lat, 3):>8} {fmt(cpu, 3):>8} {fmt(rp):>9} {fmt(rd):>9}")
PY
log "results: $RESULTS_DIR/encrypted-$STAMP.csv"
