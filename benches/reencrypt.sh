#!/usr/bin/env bash
# reencrypt benchmark: throughput of `pgenvelope reencrypt` in rows/s over ROWS rows with one
# encrypted column, and its effect on a concurrent pgbench read-only workload (TPS with and
# without re-encryption running).
#
# Not a test: it measures. Uses its own private PostgreSQL cluster (fsync off), a fresh local
# KEK and a release build. Steps:
#   1. ROWS plaintext rows (64-byte values, 10 organisations) inserted directly;
#      `pgbench -i -s SCALE` tables next to them.
#   2. pgbench -S alone for DURATION seconds (baseline TPS).
#   3. reencrypt alone: plaintext -> enc:v1 (rows/s).
#   4. keys rotate for every organisation, then reencrypt (moving every value off the retired
#      DEKs) while pgbench -S runs for DURATION seconds (TPS during, rows/s under load).
#
# Usage: benches/reencrypt.sh
# Environment: ROWS=1000000 SCALE=10 DURATION=15 CLIENTS=4 BATCH=500 PGENVELOPE_BIN=…
#              PGENVELOPE_NO_BUILD=1 PGENVELOPE_PG_BINDIR=… RESULTS_DIR=benches/results
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROWS=${ROWS:-1000000}
SCALE=${SCALE:-10}
DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-4}
BATCH=${BATCH:-500}
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
WORK=$(mktemp -d /tmp/pgenv-reencbench.XXXXXX)
if [ -z "$WORK" ] || [ ! -d "$WORK" ]; then die "no work directory"; fi
PG_PID="" ; REENC_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in $REENC_PID $PG_PID; do
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
    echo "max_connections = 100"
    echo "shared_buffers = 256MB"
    echo "fsync = off"
    echo "synchronous_commit = off"
    echo "full_page_writes = off"
} >>"$WORK/data/postgresql.conf"
"${AS_PG[@]}" "$PG_BINDIR/postgres" -D "$WORK/data" -p "$PG_PORT" >"$WORK/postgres.log" 2>&1 &
PG_PID=$!
for _ in $(seq 1 100); do "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.1; done
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres)
URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"

log "loading $ROWS plaintext rows and pgbench scale $SCALE"
"${PSQL[@]}" -c "
  CREATE TABLE bench_reenc (id bigint primary key, org_id text not null, secret text);
  INSERT INTO bench_reenc SELECT g, 'org' || (g % 10), md5(g::text) || md5((-g)::text)
    FROM generate_series(1, $ROWS) g;"
"${PSQL[@]}" -c "VACUUM ANALYZE bench_reenc"
"$PG_BINDIR/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$WORK/pgbench-init.log" 2>&1
mkdir -p "$WORK/rules"
printf '[[table]]\nname = "public.bench_reenc"\ntenant_column = "org_id"\nencrypt = ["secret"]\n' >"$WORK/rules/bench.toml"
COMMON=(--upstream "$URL" --rules "$WORK/rules" --kms "local:$WORK/kek")

pgbench_tps() { # output file
    "$PG_BINDIR/pgbench" -n -S -M prepared -h 127.0.0.1 -p "$PG_PORT" -U postgres \
        -c "$CLIENTS" -j "$(( CLIENTS < 2 ? CLIENTS : 2 ))" -T "$DURATION" postgres >"$1" 2>&1 \
        || die "pgbench failed: $(cat "$1")"
    sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$1"
}
now() { date +%s.%N; }
rate() { python3 -c "print(round($1 / ($3 - $2)))"; }

log "pgbench -S alone, ${DURATION}s"
TPS_ALONE=$(pgbench_tps "$WORK/pgbench-alone.log")

log "reencrypt alone: plaintext -> enc:v1"
T0=$(now)
"$PGENVELOPE_BIN" reencrypt "${COMMON[@]}" --batch "$BATCH" >"$WORK/reenc-1.out" 2>"$WORK/reenc-1.log" \
    || die "reencrypt failed: $(cat "$WORK/reenc-1.out" "$WORK/reenc-1.log")"
T1=$(now)
ENCRYPT_RATE=$(rate "$ROWS" "$T0" "$T1")
grep -q "$ROWS encrypted from plaintext" "$WORK/reenc-1.out" || die "unexpected summary: $(cat "$WORK/reenc-1.out")"

for o in $(seq 0 9); do
    "$PGENVELOPE_BIN" keys rotate --org "org$o" --upstream "$URL" --kms "local:$WORK/kek" \
        --reason benchmark >/dev/null
done
"${PSQL[@]}" -c "VACUUM ANALYZE bench_reenc"

log "reencrypt (move off retired DEKs) with pgbench -S running, ${DURATION}s"
T0=$(now)
"$PGENVELOPE_BIN" reencrypt "${COMMON[@]}" --batch "$BATCH" >"$WORK/reenc-2.out" 2>"$WORK/reenc-2.log" &
REENC_PID=$!
sleep 1
TPS_DURING=$(pgbench_tps "$WORK/pgbench-during.log")
if ! kill -0 "$REENC_PID" 2>/dev/null; then
    log "warning: reencrypt finished before pgbench did; raise ROWS or lower DURATION"
fi
wait "$REENC_PID" || die "reencrypt failed: $(cat "$WORK/reenc-2.out" "$WORK/reenc-2.log")"
REENC_PID=""
T1=$(now)
MOVE_RATE=$(rate "$ROWS" "$T0" "$T1")
grep -q "$ROWS moved from retired DEKs" "$WORK/reenc-2.out" || die "unexpected summary: $(cat "$WORK/reenc-2.out")"

mkdir -p "$RESULTS_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$RESULTS_DIR/reencrypt-$STAMP.csv
{
    echo "metric,value"
    echo "rows,$ROWS"
    echo "batch,$BATCH"
    echo "encrypt_rows_per_s,$ENCRYPT_RATE"
    echo "move_rows_per_s_under_pgbench,$MOVE_RATE"
    echo "pgbench_clients,$CLIENTS"
    echo "pgbench_tps_alone,$TPS_ALONE"
    echo "pgbench_tps_during_reencrypt,$TPS_DURING"
} >"$OUT"
python3 - "$ROWS" "$ENCRYPT_RATE" "$MOVE_RATE" "$TPS_ALONE" "$TPS_DURING" "$CLIENTS" <<'PY'
import sys
rows, enc, move, alone, during, clients = sys.argv[1:]
print(f"reencrypt, {int(rows):,} rows, one encrypted column")
print(f"  {'plaintext -> enc:v1 (alone)':40} {int(enc):>10,} rows/s")
print(f"  {'retired DEK -> active (pgbench running)':40} {int(move):>10,} rows/s")
print(f"pgbench -S, {clients} clients")
print(f"  {'alone':40} {float(alone):>10,.0f} tps")
print(f"  {'during reencrypt':40} {float(during):>10,.0f} tps")
print(f"  {'ratio during / alone':40} {float(during) / float(alone):>10.2f}")
PY
log "results: $OUT"
