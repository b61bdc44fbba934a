#!/usr/bin/env bash
# The benchmark suite: one command that starts its own PostgreSQL, pgbouncer and pgenvelope
# processes, runs every scenario with the targets interleaved, and writes a CSV, a Markdown
# table and a PNG chart to benches/results/<timestamp>/.
#
# Not a test: it measures, and asserts nothing about time. Ratios are taken between targets
# measured in the same round, so a busy machine shifts all of them alike.
#
# Scenarios (SCENARIOS, in this order):
#   memory       proxy RSS with IDLE_CONNS idle client connections (pgbouncer, pgenvelope
#                without rules, pgenvelope with rules), and the cost per connection
#   passthrough  pgbench -S, simple and prepared, CLIENTS clients: direct, pgbouncer (session
#                mode), pgenvelope with no rules
#   encrypted    insert and point select of rows with two encrypted text columns (64 B and
#                1 KiB values), prepared: through pgenvelope, vs the same statements on a table
#                without rules through pgenvelope and directly; `pgenvelope-bound` is the same
#                with row binding (`row_key = "id"`: client-given keys, the key in every read)
#   orm          the hidden look-ups an ORM's statements can cost, prepared, same values as
#                `encrypted`, ENC_CLIENTS clients. update-by-key: `UPDATE t SET a, b WHERE
#                id = $` directly; through pgenvelope with the tenant in the WHERE (no look-up),
#                with no tenant known (the tenant look-up: one extra round trip), and under a
#                session tenant given at connect time (`options=-c pgenvelope.tenant=...`:
#                pinned, no look-up). insert-drawn-key: an INSERT leaving out a bigserial id,
#                directly and on an encrypted table; a client-given key on a row-bound table;
#                the id left out on a row-bound table, whose key is drawn from its sequence
#                first (one extra round trip). Each also runs the look-up's own SELECT alone,
#                directly (`direct-lookup-alone`, `direct-draw-alone`): one round trip's cost
#   search       equality look-ups on a searchable encrypted column (`search = "equality"`),
#                SEARCH_MODES, ENC_CLIENTS clients, over SEARCH_ROWS rows of SEARCH_ORGS
#                organisations (written by COPY through the proxy, so every value carries its
#                term), indexed on `left(email, 31)` and on the plaintext copy `email_plain`:
#                `WHERE email_plain = $` directly and through pgenvelope, and `WHERE email = $`
#                through pgenvelope under a session tenant given at connect time (the value
#                replaced by its term, the returned value decrypted). Before timing, each
#                look-up must return its one row, and EXPLAIN of the encrypted one sent through
#                the proxy must show a scan of the term index (plans in search_explain.txt).
#                The targets' order turns each round. Set-up (load through the proxy, indexes)
#                takes ~20 s for 1,000,000 rows; benches/search.sh runs this scenario alone
#   bulk         SELECT of BULK_ROWS rows with one encrypted column of BULK_VALUES bytes, vs
#                the same rows unencrypted through pgenvelope and directly: plaintext MB per
#                second of wall time and per second of proxy CPU
#   coldstart    ORGS organisations each writing once through a proxy with an empty key store
#                (new keys), then again through a restarted proxy (cold cache, keys exist), then
#                again warm: KEK calls (from /metrics) and key-store statements (from
#                pg_stat_statements) per organisation, and the time each pass takes
#
# Usage: benches/run.sh                      (needs PostgreSQL 15, pgbench, pgbouncer, python3)
#
# Environment (all optional):
#   DURATION=10 ROUNDS=3 CLIENTS="1 8 64" MODES="simple prepared"  pgbench scenarios
#   ENC_CLIENTS="1 8"       clients of the encrypted workload
#   SCALE=10                pgbench -i -s
#   BULK_ROWS=1000000 BULK_VALUES="256 1024" (plaintext bytes per value; one table each)
#   BULK_ROUNDS=$ROUNDS
#   ORGS=10000              cold start organisations
#   IDLE_CONNS=1000         memory scenario connections
#   ORM_ROWS=20000 ORM_TENANT=3  rows of the orm update tables (organisation = id % 10), and
#                           the session tenant (0-9) of the orm scenario's session-tenant target
#   SEARCH_ROWS=1000000 SEARCH_ORGS=100 SEARCH_TENANT=7  rows of the search table (organisation
#                           = id % SEARCH_ORGS), and the session tenant the look-ups run under
#   SEARCH_MODES="prepared simple"  protocols of the search scenario (simple: the value is a literal)
#   SEARCH_BATCH=10000      rows per INSERT when loading the search table
#   SCENARIOS="memory passthrough encrypted orm search bulk coldstart"
#   PT_TARGETS="direct pgbouncer pgenvelope"  add pgenvelope-rules to measure the pass-through
#                           workload through a proxy whose engine is on (rules for other tables)
#   PGENVELOPE_BIN          proxy binary (default: cargo build --release, then the target dir's)
#   PGENVELOPE_NO_BUILD=1   do not run cargo build
#   PROXY_WRAPPER           command prefix for every pgenvelope process, for profiling, e.g.
#                           "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p"
#   PGENVELOPE_PG_BINDIR    PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   RESULTS_DIR             default benches/results/<UTC timestamp>
#   BENCH_VENV              Python venv for matplotlib (default ~/.cache/pgenvelope/bench-venv);
#                           NO_CHART=1 skips the chart
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-"1 8 64"}
MODES=${MODES:-"simple prepared"}
ENC_CLIENTS=${ENC_CLIENTS:-"1 8"}
SCALE=${SCALE:-10}
BULK_ROWS=${BULK_ROWS:-1000000}
BULK_VALUES=${BULK_VALUES:-"256 1024"}
BULK_ROUNDS=${BULK_ROUNDS:-$ROUNDS}
ORGS=${ORGS:-10000}
IDLE_CONNS=${IDLE_CONNS:-1000}
ORM_ROWS=${ORM_ROWS:-20000}
ORM_TENANT=${ORM_TENANT:-3}
SEARCH_ROWS=${SEARCH_ROWS:-1000000}
SEARCH_ORGS=${SEARCH_ORGS:-100}
SEARCH_TENANT=${SEARCH_TENANT:-7}
SEARCH_MODES=${SEARCH_MODES:-"prepared simple"}
SEARCH_BATCH=${SEARCH_BATCH:-10000}
SCENARIOS=${SCENARIOS:-"memory passthrough encrypted orm search bulk coldstart"}
PT_TARGETS=${PT_TARGETS:-"direct pgbouncer pgenvelope"}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=${RESULTS_DIR:-$REPO_DIR/benches/results/$STAMP}
PG_BINDIR=${PGENVELOPE_PG_BINDIR:-/usr/lib/postgresql/15/bin}
NCPU=$(nproc)
CLK_TCK=$(getconf CLK_TCK)
DB=bench
USER_=postgres

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }

[ -x "$PG_BINDIR/initdb" ] || die "no PostgreSQL binaries in $PG_BINDIR (set PGENVELOPE_PG_BINDIR)"
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$PGBOUNCER" ] || die "pgbouncer not found"
PGBENCH=$PG_BINDIR/pgbench
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U "$USER_")

if [ -z "${PGENVELOPE_BIN:-}" ]; then
    TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}
    if [ "${PGENVELOPE_NO_BUILD:-}" != 1 ]; then
        log "cargo build --release --bin pgenvelope"
        (cd "$REPO_DIR" && cargo build --release --locked --bin pgenvelope) >&2 \
            || die "cargo build --release failed"
    fi
    PGENVELOPE_BIN=$TARGET_DIR/release/pgenvelope
fi
[ -x "$PGENVELOPE_BIN" ] || die "no pgenvelope binary at $PGENVELOPE_BIN"

# PostgreSQL and pgbouncer refuse to run as root: setpriv execs in place, so $! is the server.
if [ "$(id -u)" = 0 ]; then AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups); else AS_PG=(); fi

WORK=$(mktemp -d /tmp/pgenv-suite.XXXXXX)
[ "$(id -u)" != 0 ] || chown postgres: "$WORK"
PIDS=()   # every server we start, stopped in reverse order on exit
cleanup() {
    local rc=$? i pid
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[$i]}
        kill -0 "$pid" 2>/dev/null || continue
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ "$rc" != 0 ]; then
        for f in "$WORK"/*.log; do [ -f "$f" ] && { log "--- $f"; tail -n 15 "$f" >&2; }; done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_ready() { # port pid name [db]
    local port=$1 pid=$2 name=$3 db=${4:-$DB}
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || { log "$name exited during start"; return 1; }
        "${PSQL[@]}" -p "$port" -d "$db" -Atc 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "$name did not accept connections on port $port"
    return 1
}

cpu_ticks() { # pid -> utime+stime in clock ticks
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} ))
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL: private cluster, no durability, room for IDLE_CONNS backends.
PG_PORT=$(free_port)
"${AS_PG[@]}" "$PG_BINDIR/initdb" -D "$WORK/data" -U "$USER_" -A trust -E UTF8 --locale=C \
    --no-sync >"$WORK/initdb.log" 2>&1 || die "initdb failed"
mkdir -p "$WORK/sock"
[ "$(id -u)" != 0 ] || chown postgres: "$WORK/sock"
cat >>"$WORK/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK/sock'
max_connections = $((IDLE_CONNS + 200))
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
EOF
"${AS_PG[@]}" "$PG_BINDIR/postgres" -D "$WORK/data" -p "$PG_PORT" >"$WORK/postgres.log" 2>&1 &
PG_PID=$!; PIDS+=("$PG_PID")
wait_ready "$PG_PORT" "$PG_PID" postgres postgres || die "postgres did not start"
"${PSQL[@]}" -p "$PG_PORT" -d postgres -c "CREATE DATABASE $DB" -c "CREATE DATABASE cold"
"${PSQL[@]}" -p "$PG_PORT" -d cold -c "CREATE EXTENSION pg_stat_statements"
log "postgres pid $PG_PID port $PG_PORT; pgbench -i -s $SCALE"
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$USER_" "$DB" >"$WORK/init.log" 2>&1 \
    || die "pgbench -i failed"
"${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "
  CREATE TABLE bench_enc (id bigserial primary key, org_id text not null, a text, b text);
  CREATE TABLE bench_plain (id bigserial primary key, org_id text not null, a text, b text);
  CREATE TABLE bench_bound (id bigint primary key, org_id text not null, a text, b text);
  CREATE TABLE orm_upd_plain (id bigint primary key, org_id text not null, a text, b text);
  CREATE TABLE orm_upd_enc (id bigint primary key, org_id text not null, a text, b text);
  CREATE TABLE orm_ins_plain (id bigserial primary key, org_id text not null, a text, b text);
  CREATE TABLE orm_ins_enc (id bigserial primary key, org_id text not null, a text, b text);
  CREATE TABLE orm_ins_given (id bigint primary key, org_id text not null, a text, b text);
  CREATE TABLE orm_ins_drawn (id bigserial primary key, org_id text not null, a text, b text);
"
for v in $BULK_VALUES; do
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "
      CREATE TABLE bulk_enc_$v (id int primary key, org_id text not null, secret text);
      CREATE TABLE bulk_plain_$v (id int primary key, org_id text not null, secret text);"
done
"${PSQL[@]}" -p "$PG_PORT" -d cold -c "
  CREATE TABLE cold_secrets (id bigserial primary key, org_id text not null, value text);
  CREATE SEQUENCE org_seq;"

# pgbouncer, session mode, enough pool for the memory scenario.
BOUNCER_PORT=$(free_port)
printf '"%s" ""\n' "$USER_" >"$WORK/users.txt"
cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
$DB = host=127.0.0.1 port=$PG_PORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/users.txt
pool_mode = session
max_client_conn = $((IDLE_CONNS + 100))
default_pool_size = $((IDLE_CONNS + 50))
max_db_connections = 0
ignore_startup_parameters = extra_float_digits,options
logfile = $WORK/pgbouncer.log
EOF
[ "$(id -u)" != 0 ] || chown postgres: "$WORK/pgbouncer.ini" "$WORK/users.txt"
"${AS_PG[@]}" "$PGBOUNCER" "$WORK/pgbouncer.ini" >>"$WORK/pgbouncer.out.log" 2>&1 &
BOUNCER_PID=$!; PIDS+=("$BOUNCER_PID")
wait_ready "$BOUNCER_PORT" "$BOUNCER_PID" pgbouncer || die "pgbouncer did not start"

# pgenvelope instances: `plain` has no rules (a pure relay), `rules` encrypts the bench tables.
mkdir -p "$WORK/rules-none" "$WORK/rules-bench" "$WORK/rules-cold"
cat >"$WORK/rules-bench/bench.toml" <<'EOF'
[[table]]
name = "public.bench_enc"
tenant_column = "org_id"
encrypt = ["a", "b"]

[[table]]
name = "public.bench_bound"
tenant_column = "org_id"
row_key = "id"
encrypt = ["a", "b"]

[[table]]
name = "public.orm_upd_enc"
tenant_column = "org_id"
encrypt = ["a", "b"]

[[table]]
name = "public.orm_ins_enc"
tenant_column = "org_id"
encrypt = ["a", "b"]

[[table]]
name = "public.orm_ins_given"
tenant_column = "org_id"
row_key = "id"
encrypt = ["a", "b"]

[[table]]
name = "public.orm_ins_drawn"
tenant_column = "org_id"
row_key = "id"
encrypt = ["a", "b"]
EOF
for v in $BULK_VALUES; do
    printf '\n[[table]]\nname = "public.bulk_enc_%s"\ntenant_column = "org_id"\nencrypt = ["secret"]\n' \
        "$v" >>"$WORK/rules-bench/bench.toml"
done
cat >"$WORK/rules-cold/cold.toml" <<'EOF'
[[table]]
name = "public.cold_secrets"
tenant_column = "org_id"
encrypt = ["value"]
EOF
start_proxy() { # name rules db [extra args...] -> STARTED_PID STARTED_PORT STARTED_ADMIN
    local name=$1 rules=$2 db=$3
    shift 3
    STARTED_PORT=$(free_port)
    STARTED_ADMIN=$(free_port)
    # shellcheck disable=SC2086
    (cd "$WORK" && exec ${PROXY_WRAPPER:-} "$PGENVELOPE_BIN" serve --listen "127.0.0.1:$STARTED_PORT" \
        --upstream "postgres://$USER_@127.0.0.1:$PG_PORT/$db" --rules "$WORK/$rules" \
        --kms "local:$WORK/kek" --admin "127.0.0.1:$STARTED_ADMIN" --log warn "$@") \
        >>"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!; PIDS+=("$STARTED_PID")
    wait_ready "$STARTED_PORT" "$STARTED_PID" "$name" "$db" || die "$name did not start"
}
start_proxy pgenvelope rules-none "$DB"
PLAIN_PID=$STARTED_PID; PLAIN_PORT=$STARTED_PORT
start_proxy pgenvelope-rules rules-bench "$DB"
RULES_PID=$STARTED_PID; RULES_PORT=$STARTED_PORT
log "pgbouncer pid $BOUNCER_PID port $BOUNCER_PORT; pgenvelope pid $PLAIN_PID port $PLAIN_PORT;" \
    "pgenvelope with rules pid $RULES_PID port $RULES_PORT"

mkdir -p "$RESULTS_DIR"
RAW=$RESULTS_DIR/raw.csv
echo "scenario,round,target,mode,clients,tps,mean_ms,p99_ms,statements,proxy_cpu_s,wall_s,extra" >"$RAW"
record() { echo "$*" >>"$RAW"; }

# ---------------------------------------------------------------------------------------------
# One pgbench run with per-transaction logging (for p99). Sets TPS MEAN P99 COUNT CPU_S.
pgbench_run() { # port pid(or -) script-args...
    local port=$1 pid=$2 before after out
    shift 2
    rm -rf "$WORK/pglog"; mkdir -p "$WORK/pglog"
    before=0; [ "$pid" = - ] || before=$(cpu_ticks "$pid")
    out=$("$PGBENCH" -n -h 127.0.0.1 -p "$port" -U "$USER_" -l \
        --log-prefix="$WORK/pglog/tx" "$@" 2>&1) || die "pgbench failed on port $port: $out"
    CPU_S=""
    if [ "$pid" != - ]; then
        after=$(cpu_ticks "$pid")
        CPU_S=$(python3 -c "print(($after - $before) / $CLK_TCK)")
    fi
    TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -n1)
    MEAN=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out" | head -n1)
    COUNT=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    if [ -z "$TPS" ] || [ -z "$MEAN" ] || [ -z "$COUNT" ]; then die "unparsed pgbench output: $out"; fi
    P99=$(cat "$WORK"/pglog/tx* | python3 -c '
import sys
lat = sorted(int(l.split()[2]) for l in sys.stdin if l.strip())
print(f"{lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000:.3f}" if lat else "")')
}

jobs_for() { echo $(( $1 < NCPU ? $1 : NCPU )); }

# ---------------------------------------------------------------------------------------------
scenario_memory() {
    log "memory: $IDLE_CONNS idle connections each to pgbouncer, pgenvelope, pgenvelope with rules"
    local target port pid out
    for target in pgbouncer pgenvelope pgenvelope-rules; do
        case $target in
            pgbouncer) port=$BOUNCER_PORT; pid=$BOUNCER_PID ;;
            pgenvelope) port=$PLAIN_PORT; pid=$PLAIN_PID ;;
            pgenvelope-rules) port=$RULES_PORT; pid=$RULES_PID ;;
        esac
        out=$(python3 "$REPO_DIR/benches/idle_conns.py" "$port" "$pid" "$IDLE_CONNS" "$USER_" "$DB") \
            || die "idle connections to $target failed"
        # out: rss0_kib rssN_kib rss_after_close_kib
        read -r rss0 rssn rssc <<<"$out"
        record "memory,1,$target,,$IDLE_CONNS,,,,,,,rss0_kib=$rss0;rss_n_kib=$rssn;rss_closed_kib=$rssc"
        log "memory $target: RSS $rss0 KiB idle, $rssn KiB with $IDLE_CONNS connections," \
            "$rssc KiB after closing: $(( (rssn - rss0) / IDLE_CONNS )) KiB per connection"
        sleep 2   # let the server reap the closed backends
    done
}

scenario_passthrough() {
    local round mode c target port pid
    for round in $(seq 1 "$ROUNDS"); do
        for mode in $MODES; do
            for c in $CLIENTS; do
                for target in $PT_TARGETS; do
                    case $target in
                        direct) port=$PG_PORT; pid=- ;;
                        pgbouncer) port=$BOUNCER_PORT; pid=$BOUNCER_PID ;;
                        pgenvelope) port=$PLAIN_PORT; pid=$PLAIN_PID ;;
                        pgenvelope-rules) port=$RULES_PORT; pid=$RULES_PID ;;
                        *) die "unknown pass-through target $target" ;;
                    esac
                    pgbench_run "$port" "$pid" -S -T "$DURATION" -c "$c" -j "$(jobs_for "$c")" \
                        -M "$mode" "$DB"
                    record "passthrough,$round,$target,$mode,$c,$TPS,$MEAN,$P99,$COUNT,$CPU_S,,"
                    log "passthrough r$round $mode c=$c $target: $TPS tps, mean $MEAN ms, p99 $P99 ms, cpu ${CPU_S:--} s"
                done
            done
        done
    done
}

scenario_encrypted() {
    local v64 v1k t round w c target port table
    v64=$(printf 'x%.0s' $(seq 64)); v1k=$(printf 'y%.0s' $(seq 1024))
    log "encrypted: loading 20000 rows into each table (bench_enc through the proxy)"
    printf '%s\n' '\set org random(0, 9)' \
        'INSERT INTO bench_enc (org_id, a, b) VALUES (:org, :v64, :v1k);' >"$WORK/load.sql"
    "$PGBENCH" -n -M prepared -h 127.0.0.1 -p "$RULES_PORT" -U "$USER_" -c 4 -j 2 -t 5000 \
        -D v64="$v64" -D v1k="$v1k" -f "$WORK/load.sql" "$DB" >"$WORK/load.log" 2>&1 \
        || die "loading bench_enc through the proxy failed: $(tail -n 5 "$WORK/load.log")"
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "INSERT INTO bench_plain (org_id, a, b)
        SELECT (g % 10)::text, repeat('x', 64), repeat('y', 1024) FROM generate_series(1, 20000) g" \
        -c "VACUUM ANALYZE bench_enc" -c "VACUUM ANALYZE bench_plain"
    # Row-bound rows carry client-given keys: 1..20000 loaded by COPY through the proxy, and
    # inserts draw keys from a range far above them.
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "COPY (SELECT g, (g % 10)::text, repeat('x', 64),
        repeat('y', 1024) FROM generate_series(1, 20000) g) TO STDOUT" \
        | "${PSQL[@]}" -p "$RULES_PORT" -d "$DB" -c "COPY bench_bound (id, org_id, a, b) FROM STDIN" \
        || die "COPY into bench_bound through the proxy failed"
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "VACUUM ANALYZE bench_bound"
    for t in enc plain; do
        printf '%s\n' '\set org random(0, 9)' \
            "INSERT INTO bench_$t (org_id, a, b) VALUES (:org, :v64, :v1k);" >"$WORK/insert_$t.sql"
        printf '%s\n' '\set id random(1, 20000)' \
            "SELECT a, b FROM bench_$t WHERE id = :id;" >"$WORK/select_$t.sql"
    done
    printf '%s\n' '\set org random(0, 9)' '\set id random(1000000, 9000000000000000000)' \
        "INSERT INTO bench_bound (id, org_id, a, b) VALUES (:id, :org, :v64, :v1k);" \
        >"$WORK/insert_bound.sql"
    # The key is read with the values: a row-bound value opens only with its row's key.
    printf '%s\n' '\set id random(1, 20000)' \
        "SELECT id, a, b FROM bench_bound WHERE id = :id;" >"$WORK/select_bound.sql"
    for round in $(seq 1 "$ROUNDS"); do
        for w in select insert; do
            for c in $ENC_CLIENTS; do
                for target in direct pgenvelope-plain pgenvelope-encrypted pgenvelope-bound; do
                    case $target in
                        direct) port=$PG_PORT; pid=-; table=plain ;;
                        pgenvelope-plain) port=$RULES_PORT; pid=$RULES_PID; table=plain ;;
                        pgenvelope-encrypted) port=$RULES_PORT; pid=$RULES_PID; table=enc ;;
                        pgenvelope-bound) port=$RULES_PORT; pid=$RULES_PID; table=bound ;;
                    esac
                    pgbench_run "$port" "$pid" -M prepared -T "$DURATION" -c "$c" \
                        -j "$(jobs_for "$c")" -D v64="$v64" -D v1k="$v1k" \
                        -f "$WORK/${w}_$table.sql" "$DB"
                    record "encrypted-$w,$round,$target,prepared,$c,$TPS,$MEAN,$P99,$COUNT,$CPU_S,,"
                    log "encrypted r$round $w c=$c $target: $TPS tps, mean $MEAN ms, p99 $P99 ms, cpu ${CPU_S:--} s"
                done
            done
        done
    done
}

# Look-ups the proxy has sent (all databases; pg_stat_statements is installed in `cold`).
orm_lookups() { orm_calls "query ILIKE 'SELECT DISTINCT %orm_upd_enc%'"; }
orm_draws() { orm_calls "query ILIKE '%pg_get_serial_sequence%'"; }
orm_calls() {
    "${PSQL[@]}" -p "$PG_PORT" -d cold -Atc "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE $1"
}

# ORM statements that make the proxy look something up first, on the client's own session:
# an UPDATE by primary key alone with no tenant known (the rows' organisation), and an INSERT
# leaving a row-bound bigserial key to its default (the keys, drawn from its sequence).
scenario_orm() {
    local v64 v1k round w c t target port pid script mode db f plain
    local session_db="dbname=$DB options='-c pgenvelope.tenant=$ORM_TENANT'"
    v64=$(printf 'x%.0s' $(seq 64)); v1k=$(printf 'y%.0s' $(seq 1024))
    [[ "$ORM_TENANT" =~ ^[0-9]$ ]] || die "ORM_TENANT must be one of the organisations 0-9"
    log "orm: loading $ORM_ROWS rows into orm_upd_plain (directly) and orm_upd_enc (COPY through the proxy)"
    # A row's organisation is a function of its id (id % 10): a script knows whose row it updates.
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "INSERT INTO orm_upd_plain (id, org_id, a, b)
        SELECT g, (g % 10)::text, repeat('x', 64), repeat('y', 1024)
        FROM generate_series(1, $ORM_ROWS) g"
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "COPY orm_upd_plain (id, org_id, a, b) TO STDOUT" \
        | "${PSQL[@]}" -p "$RULES_PORT" -d "$DB" -c "COPY orm_upd_enc (id, org_id, a, b) FROM STDIN" \
        || die "COPY into orm_upd_enc through the proxy failed"
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "VACUUM ANALYZE orm_upd_plain" -c "VACUUM ANALYZE orm_upd_enc"

    # update-by-key. The session-tenant script updates only rows of ORM_TENANT (id % 10 =
    # ORM_TENANT): the pinned `AND org_id = <tenant>` would leave any other row alone.
    printf '%s\n' "\\set id random(1, $ORM_ROWS)" \
        'UPDATE orm_upd_plain SET a = :v64, b = :v1k WHERE id = :id;' >"$WORK/orm_upd_direct.sql"
    printf '%s\n' "\\set id random(1, $ORM_ROWS)" '\set org :id % 10' \
        'UPDATE orm_upd_enc SET a = :v64, b = :v1k WHERE id = :id AND org_id = :org;' \
        >"$WORK/orm_upd_where.sql"
    printf '%s\n' "\\set id random(1, $ORM_ROWS)" \
        'UPDATE orm_upd_enc SET a = :v64, b = :v1k WHERE id = :id;' >"$WORK/orm_upd_lookup.sql"
    printf '%s\n' "\\set id 10 * random($(( ORM_TENANT == 0 )), $(( (ORM_ROWS - ORM_TENANT) / 10 ))) + $ORM_TENANT" \
        'UPDATE orm_upd_enc SET a = :v64, b = :v1k WHERE id = :id;' >"$WORK/orm_upd_session.sql"
    # The look-up the proxy sends, alone: a literal id, parsed and planned each time.
    printf '%s\n' "\\set id random(1, $ORM_ROWS)" \
        "SELECT DISTINCT org_id::text FROM orm_upd_enc WHERE id = ':id' LIMIT 2;" \
        >"$WORK/orm_upd_alone.sql"
    # insert-drawn-key. Client-given keys come from a range far above any drawn one.
    for t in plain enc drawn; do
        printf '%s\n' '\set org random(0, 9)' \
            "INSERT INTO orm_ins_$t (org_id, a, b) VALUES (:org, :v64, :v1k);" >"$WORK/orm_ins_$t.sql"
    done
    printf '%s\n' '\set org random(0, 9)' '\set id random(1000000, 9000000000000000000)' \
        'INSERT INTO orm_ins_given (id, org_id, a, b) VALUES (:id, :org, :v64, :v1k);' \
        >"$WORK/orm_ins_given.sql"
    printf '%s\n' "SELECT nextval(pg_get_serial_sequence('\"public\".\"orm_ins_plain\"','id'))::text FROM generate_series(1, 1);" \
        >"$WORK/orm_ins_alone.sql"

    # Before measuring, each statement through the proxy must write exactly one row (the same
    # scripts with `RETURNING id ... \gset` fail pgbench unless one row comes back), and make
    # the look-ups it is meant to: one tenant look-up per UPDATE in pgenvelope-lookup, one key
    # draw per INSERT in pgenvelope-bound-drawn, none elsewhere (counted by pg_stat_statements).
    local n=20 lookups draws expect
    for f in orm_upd_where orm_upd_lookup orm_upd_session orm_ins_enc orm_ins_given orm_ins_drawn; do
        sed 's/;$/ RETURNING id AS got \\gset/' "$WORK/$f.sql" >"$WORK/check_$f.sql"
        db=$DB; [ "$f" != orm_upd_session ] || db=$session_db
        lookups=$(orm_lookups); draws=$(orm_draws)
        "$PGBENCH" -n -M prepared -h 127.0.0.1 -p "$RULES_PORT" -U "$USER_" -c 1 -t "$n" \
            -D v64="$v64" -D v1k="$v1k" -f "$WORK/check_$f.sql" "$db" >"$WORK/check_$f.log" 2>&1 \
            || die "$f through the proxy did not write one row each time: $(tail -n 5 "$WORK/check_$f.log")"
        lookups=$(( $(orm_lookups) - lookups )); draws=$(( $(orm_draws) - draws ))
        case $f in
            orm_upd_lookup) expect="$n 0" ;;
            orm_ins_drawn) expect="0 $n" ;;
            *) expect="0 0" ;;
        esac
        [ "$lookups $draws" = "$expect" ] || die "$f: $lookups tenant look-ups and $draws key draws" \
            "for $n statements (expected $expect)"
    done

    for round in $(seq 1 "$ROUNDS"); do
        for w in update-by-key insert-drawn-key; do
            for c in $ENC_CLIENTS; do
                for target in direct pgenvelope-tenant-in-where pgenvelope-lookup \
                    pgenvelope-session-tenant pgenvelope-encrypted pgenvelope-bound-given \
                    pgenvelope-bound-drawn direct-lookup-alone direct-draw-alone; do
                    port=$RULES_PORT; pid=$RULES_PID; mode=prepared; db=$DB
                    case $w:$target in
                        update-by-key:direct) port=$PG_PORT; pid=-; script=orm_upd_direct ;;
                        update-by-key:pgenvelope-tenant-in-where) script=orm_upd_where ;;
                        update-by-key:pgenvelope-lookup) script=orm_upd_lookup ;;
                        update-by-key:pgenvelope-session-tenant)
                            script=orm_upd_session; db=$session_db ;;
                        update-by-key:direct-lookup-alone)
                            port=$PG_PORT; pid=-; mode=simple; script=orm_upd_alone ;;
                        insert-drawn-key:direct) port=$PG_PORT; pid=-; script=orm_ins_plain ;;
                        insert-drawn-key:pgenvelope-encrypted) script=orm_ins_enc ;;
                        insert-drawn-key:pgenvelope-bound-given) script=orm_ins_given ;;
                        insert-drawn-key:pgenvelope-bound-drawn) script=orm_ins_drawn ;;
                        insert-drawn-key:direct-draw-alone)
                            port=$PG_PORT; pid=-; mode=simple; script=orm_ins_alone ;;
                        *) continue ;;
                    esac
                    pgbench_run "$port" "$pid" -M "$mode" -T "$DURATION" -c "$c" \
                        -j "$(jobs_for "$c")" -D v64="$v64" -D v1k="$v1k" \
                        -f "$WORK/$script.sql" "$db"
                    record "orm-$w,$round,$target,$mode,$c,$TPS,$MEAN,$P99,$COUNT,$CPU_S,,"
                    log "orm r$round $w c=$c $target: $TPS tps, mean $MEAN ms, p99 $P99 ms, cpu ${CPU_S:--} s"
                done
            done
        done
    done

    # Every value written through the proxy is sealed: no plaintext in an encrypted column.
    plain=$("${PSQL[@]}" -p "$PG_PORT" -d "$DB" -Atc "SELECT sum(n) FROM (
        SELECT count(*) AS n FROM orm_upd_enc WHERE a NOT LIKE 'enc:v1:%' OR b NOT LIKE 'enc:v1:%'
        UNION ALL SELECT count(*) FROM orm_ins_enc WHERE a NOT LIKE 'enc:v1:%' OR b NOT LIKE 'enc:v1:%'
        UNION ALL SELECT count(*) FROM orm_ins_given WHERE a NOT LIKE 'enc:v1:%' OR b NOT LIKE 'enc:v1:%'
        UNION ALL SELECT count(*) FROM orm_ins_drawn WHERE a NOT LIKE 'enc:v1:%' OR b NOT LIKE 'enc:v1:%'
    ) s")
    [ "$plain" = 0 ] || die "orm: $plain rows hold plaintext in an encrypted column"
}

# Equality look-ups on a searchable encrypted column: one table of SEARCH_ROWS rows over
# SEARCH_ORGS organisations, each row's value both in `email` (searchable, written through
# the proxy, so every value carries its organisation's search term) and in `email_plain` (no
# rules). pgbench's expressions produce only numbers, so a script can bind nothing but a
# number: the values are 19-digit decimal strings (e-mail-sized), row g's being 10^18 + g.
# Prepared, the value is the statement's parameter; simple, a literal.
search_value() { echo $(( 1000000000000000000 + $1 )); }

scenario_search() {
    local n=$SEARCH_ROWS orgs=$SEARCH_ORGS tenant=$SEARCH_TENANT
    local session_db="dbname=$DB options='-c pgenvelope.tenant=$tenant'"
    local port pid db mode c round target script check t0 plan plans other got v t
    [[ "$tenant" =~ ^[0-9]+$ ]] && [ "$tenant" -lt "$orgs" ] && [ "$n" -ge "$orgs" ] \
        || die "SEARCH_TENANT must be one of the organisations 0-$((orgs - 1)), and SEARCH_ROWS >= SEARCH_ORGS"
    log "search: $n rows over $orgs organisations (email written through the proxy)"
    t0=$(date +%s)
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "CREATE TABLE search_t
        (id bigint primary key, org_id text not null, email text, email_plain text)"
    mkdir -p "$WORK/rules-search"
    cat >"$WORK/rules-search/search.toml" <<'RULES'
[[table]]
name = "public.search_t"
tenant_column = "org_id"
encrypt = [{ name = "email", search = "equality" }]
RULES
    start_proxy pgenvelope-search rules-search "$DB"
    local sport=$STARTED_PORT spid=$STARTED_PID
    # Written as Django's bulk_create writes: INSERT … SELECT * FROM UNNEST(arrays), here with
    # the arrays as literals (psql binds no parameters), up to SEARCH_BATCH rows of one
    # organisation per statement. Not COPY, which this version refuses on a searchable column
    # (the search key is never fetched for it), and not rows of many organisations in one
    # statement: a session fetches one missing key per round, and gives up after 16 rounds.
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -Atc "SELECT format('INSERT INTO search_t (id, org_id,
        email, email_plain) SELECT * FROM UNNEST(%L::bigint[], %L::text[], %L::text[], %L::text[]);',
        array_agg(g), array_agg((g % $orgs)::text), array_agg(v), array_agg(v))
        FROM (SELECT g, (1000000000000000000 + g)::text AS v FROM generate_series(1, $n) g) s
        GROUP BY g % $orgs, g / $orgs / $SEARCH_BATCH" \
        | "${PSQL[@]}" -p "$sport" -d "$DB" -f - >/dev/null \
        || die "loading search_t through the proxy failed"
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" \
        -c "CREATE INDEX search_t_email_term ON search_t (left(email, 31))" \
        -c "CREATE INDEX search_t_email_plain ON search_t (email_plain)" \
        -c "VACUUM ANALYZE search_t"
    # Every value sealed with a term, and the terms as unique as the values.
    check=$("${PSQL[@]}" -p "$PG_PORT" -d "$DB" -Atc "SELECT count(*) FILTER (WHERE email LIKE 'enc:v1:%'
        AND email_plain NOT LIKE 'enc:v1:%'), count(DISTINCT left(email, 31)), count(DISTINCT org_id) FROM search_t")
    [ "$check" = "$n|$n|$orgs" ] || die "search_t: (sealed, distinct terms, organisations) = $check, expected $n|$n|$orgs"
    log "search: set-up took $(( $(date +%s) - t0 )) s"

    # The scripts: a random row of the session tenant's organisation (id % orgs = tenant).
    local pick="\\set n $orgs * random($(( tenant == 0 )), $(( (n - tenant) / orgs ))) + $tenant"
    local val='\set e 1000000000000000000 + :n'
    for mode in $SEARCH_MODES; do
        [ "$mode" = prepared ] || [ "$mode" = simple ] || die "SEARCH_MODES: prepared or simple, not $mode"
        v=':e'; [ "$mode" = prepared ] || v="':e'"
        printf '%s\n' "$pick" "$val" "SELECT id, email_plain FROM search_t WHERE email_plain = $v;" \
            >"$WORK/search_plain_$mode.sql"
        printf '%s\n' "$pick" "$val" "SELECT id, email FROM search_t WHERE email = $v;" \
            >"$WORK/search_enc_$mode.sql"
        # The same statements, failing pgbench unless exactly one row comes back (\gset) and it
        # is the row looked up, with its value decrypted.
        for t in plain enc; do
            { head -n 2 "$WORK/search_${t}_$mode.sql"
              sed 's/^SELECT id, \([a-z_]*\) /SELECT id AS got_id, \1 AS got /; s/;$/ \\gset/' \
                  "$WORK/search_${t}_$mode.sql" | tail -n 1
              printf '%s\n' '\if :got_id <> :n or :got <> :e' '\set wrong_row 1 / 0' '\endif'
            } >"$WORK/check_search_${t}_$mode.sql"
        done
    done
    for mode in $SEARCH_MODES; do
        for target in direct pgenvelope-plain pgenvelope-search; do
            case $target in
                direct) port=$PG_PORT; db=$DB; t=plain ;;
                pgenvelope-plain) port=$sport; db=$session_db; t=plain ;;
                pgenvelope-search) port=$sport; db=$session_db; t=enc ;;
            esac
            "$PGBENCH" -n -M "$mode" -h 127.0.0.1 -p "$port" -U "$USER_" -c 1 -t 50 \
                -f "$WORK/check_search_${t}_$mode.sql" "$db" >"$WORK/check_search.log" 2>&1 \
                || die "search $mode $target: a look-up did not return its one row: $(tail -n 5 "$WORK/check_search.log")"
        done
    done
    # A term is per organisation: the value of another organisation's row is not found.
    other=$(search_value $(( (tenant + 1) % orgs == 0 ? orgs : (tenant + 1) % orgs )))
    got=$("${PSQL[@]}" -p "$sport" -d "$session_db" -Atc "SELECT count(*) FROM search_t WHERE email = '$other'")
    [ "$got" = 0 ] || die "search: another organisation's value was found under tenant $tenant ($got rows)"

    # EXPLAIN of each look-up: the encrypted one sent through the proxy must use the term index.
    plans=$RESULTS_DIR/search_explain.txt
    v=$(search_value $(( orgs + tenant )))
    {
        echo "-- (a) directly: SELECT id, email_plain FROM search_t WHERE email_plain = '$v'"
        "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -Atc "EXPLAIN SELECT id, email_plain FROM search_t WHERE email_plain = '$v'"
        echo "-- (c) through pgenvelope, tenant $tenant: SELECT id, email FROM search_t WHERE email = '$v'"
        "${PSQL[@]}" -p "$sport" -d "$session_db" -Atc "EXPLAIN SELECT id, email FROM search_t WHERE email = '$v'"
    } >"$plans" || die "search: EXPLAIN failed"
    plan=$(sed -n '/^-- (c)/,$p' "$plans")
    grep -Eq 'Index Scan (using|on) search_t_email_term' <<<"$plan" \
        || die "search: EXPLAIN through the proxy does not use the term index: $plan"
    local index_scan=1; grep -q 'Bitmap Index Scan' <<<"$plan" && index_scan=2
    record "search-explain,1,pgenvelope-search,,,,,,,,,index_scan=$index_scan;rows=$n;orgs=$orgs"
    log "search: EXPLAIN through the proxy: $(sed -n 2p <<<"$plan")"

    # The targets' order turns by one each round, so that none always runs first or after the
    # same neighbour (at one client, a run's throughput follows the machine's other work).
    local scans0 scans1 stmts=0 targets=(direct pgenvelope-plain pgenvelope-search) order k
    scans0=$(search_index_scans)
    for round in $(seq 1 "$ROUNDS"); do
        k=$(( (round - 1) % 3 ))
        order=("${targets[@]:k}" "${targets[@]:0:k}")
        for mode in $SEARCH_MODES; do
            for c in $ENC_CLIENTS; do
                for target in "${order[@]}"; do
                    case $target in
                        direct) port=$PG_PORT; pid=-; db=$DB; script=search_plain_$mode ;;
                        pgenvelope-plain) port=$sport; pid=$spid; db=$session_db; script=search_plain_$mode ;;
                        pgenvelope-search) port=$sport; pid=$spid; db=$session_db; script=search_enc_$mode ;;
                    esac
                    pgbench_run "$port" "$pid" -M "$mode" -T "$DURATION" -c "$c" \
                        -j "$(jobs_for "$c")" -f "$WORK/$script.sql" "$db"
                    record "search,$round,$target,$mode,$c,$TPS,$MEAN,$P99,$COUNT,$CPU_S,,"
                    log "search r$round $mode c=$c $target: $TPS tps, mean $MEAN ms, p99 $P99 ms, cpu ${CPU_S:--} s"
                    [ "$target" != pgenvelope-search ] || stmts=$(( stmts + COUNT ))
                done
            done
        done
    done
    # The timed look-ups used the term index too (generic plans included): one scan each.
    sleep 1
    scans1=$(search_index_scans)
    record "search-index,1,pgenvelope-search,,,,,,$stmts,,,index_scans=$(( scans1 - scans0 ))"
    log "search: $(( scans1 - scans0 )) scans of the term index for $stmts encrypted look-ups"
    {
        echo "-- look-ups PostgreSQL received (pg_stat_statements: calls, and the first text seen,"
        echo "-- which is the check's with its aliases; the timed runs' statements count with it)"
        "${PSQL[@]}" -p "$PG_PORT" -d cold -Atc "SELECT calls, query FROM pg_stat_statements
            WHERE query ILIKE 'select id%search_t%' ORDER BY calls DESC"
    } >>"$plans"
}

search_index_scans() {
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -Atc "SELECT idx_scan FROM pg_stat_user_indexes
        WHERE indexrelname = 'search_t_email_term'"
}

scenario_bulk() {
    local v
    for v in $BULK_VALUES; do bulk_one "$v"; done
}

bulk_one() { # value bytes
    local v=$1 check t round target port pid wall
    log "bulk: $BULK_ROWS rows of $v B (plain directly, encrypted by COPY through the proxy)"
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "INSERT INTO bulk_plain_$v
        SELECT g, 'org' || (g % 10), left(repeat(md5(g::text), $(( v / 32 + 1 ))), $v)
        FROM generate_series(1, $BULK_ROWS) g"
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "COPY bulk_plain_$v TO STDOUT" \
        | "${PSQL[@]}" -p "$RULES_PORT" -d "$DB" -c "COPY bulk_enc_$v FROM STDIN" \
        || die "COPY into bulk_enc_$v through the proxy failed"
    "${PSQL[@]}" -p "$PG_PORT" -d "$DB" -c "VACUUM ANALYZE bulk_enc_$v" -c "VACUUM ANALYZE bulk_plain_$v"
    check=$("${PSQL[@]}" -p "$PG_PORT" -d "$DB" -Atc "SELECT count(*) FILTER (WHERE secret LIKE 'enc:v1:%'), count(*) FROM bulk_enc_$v")
    [ "$check" = "$BULK_ROWS|$BULK_ROWS" ] || die "bulk_enc_$v is not fully encrypted: $check"
    for t in enc plain; do echo "SELECT id, secret FROM bulk_${t}_$v;" >"$WORK/bulk_${t}_$v.sql"; done
    for round in $(seq 1 "$BULK_ROUNDS"); do
        for target in direct pgenvelope-plain pgenvelope-encrypted; do
            case $target in
                direct) port=$PG_PORT; pid=-; t=plain ;;
                pgenvelope-plain) port=$RULES_PORT; pid=$RULES_PID; t=plain ;;
                pgenvelope-encrypted) port=$RULES_PORT; pid=$RULES_PID; t=enc ;;
            esac
            pgbench_run "$port" "$pid" -M simple -t 1 -c 1 -f "$WORK/bulk_${t}_$v.sql" "$DB"
            wall=$(python3 -c "print($MEAN / 1000)")
            record "bulk-$v,$round,$target,simple,1,,$MEAN,,$BULK_ROWS,$CPU_S,$wall,rows=$BULK_ROWS;value_bytes=$v"
            log "bulk $v B r$round $target: ${wall}s wall, proxy cpu ${CPU_S:--} s"
        done
    done
}

metric() { # admin_port name_and_labels -> value (0 if absent)
    curl -fsS "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m { print $2; f=1 } END { if (!f) print 0 }'
}

scenario_coldstart() {
    log "cold start: $ORGS organisations, each writing once (new keys), then after a restart, then warm"
    local v64 pass pid port admin t0 t1 n stmts
    v64=$(printf 'x%.0s' $(seq 64))
    printf '%s\n' 'SELECT nextval('"'"'org_seq'"'"') AS org \gset' \
        'INSERT INTO cold_secrets (org_id, value) VALUES (:org, :v64);' >"$WORK/cold.sql"
    start_proxy pgenvelope-cold rules-cold cold --key-cache-capacity $((ORGS * 2))
    pid=$STARTED_PID; port=$STARTED_PORT; admin=$STARTED_ADMIN
    for pass in new-keys restart warm; do
        if [ "$pass" = restart ]; then
            kill -TERM "$pid"
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            start_proxy pgenvelope-cold rules-cold cold --key-cache-capacity $((ORGS * 2))
            pid=$STARTED_PID; port=$STARTED_PORT; admin=$STARTED_ADMIN
        fi
        "${PSQL[@]}" -p "$PG_PORT" -d cold -Atc "ALTER SEQUENCE org_seq RESTART" \
            -c "SELECT pg_stat_statements_reset()" >/dev/null
        local g0 u0 m0 g1 u1 m1
        g0=$(metric "$admin" 'pgenvelope_kek_requests_total{op="generate",result="ok"}')
        u0=$(metric "$admin" 'pgenvelope_kek_requests_total{op="unwrap",result="ok"}')
        m0=$(metric "$admin" 'pgenvelope_dek_cache_misses_total')
        t0=$(date +%s.%N)
        pgbench_run "$port" "$pid" -M prepared -c 8 -j 2 -t $((ORGS / 8)) -D v64="$v64" \
            -f "$WORK/cold.sql" cold
        t1=$(date +%s.%N)
        g1=$(metric "$admin" 'pgenvelope_kek_requests_total{op="generate",result="ok"}')
        u1=$(metric "$admin" 'pgenvelope_kek_requests_total{op="unwrap",result="ok"}')
        m1=$(metric "$admin" 'pgenvelope_dek_cache_misses_total')
        # Statements the proxy's service connection sent to the key store (schema pgenvelope).
        stmts=$("${PSQL[@]}" -p "$PG_PORT" -d cold -Atc "SELECT coalesce(sum(calls), 0)
            FROM pg_stat_statements WHERE query ~* '(data_keys|key_events)'")
        n=$(( $(( ORGS / 8 )) * 8 ))
        local wall
        wall=$(python3 -c "print(round($t1 - $t0, 3))")
        record "coldstart,1,$pass,prepared,8,$TPS,$MEAN,$P99,$((COUNT * 2)),$CPU_S,$wall,orgs=$n;kek_generate=$((g1 - g0));kek_unwrap=$((u1 - u0));dek_cache_misses=$((m1 - m0));keystore_statements=$stmts"
        log "coldstart $pass: $n orgs in ${wall}s; KEK generate $((g1 - g0)), unwrap $((u1 - u0));" \
            "cache misses $((m1 - m0)); key-store statements $stmts; p99 $P99 ms"
    done
}

# ---------------------------------------------------------------------------------------------
log "load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
cut -d' ' -f1-3 /proc/loadavg >"$RESULTS_DIR/load_before.txt"
for s in $SCENARIOS; do
    case $s in
        memory|passthrough|encrypted|orm|search|bulk|coldstart) "scenario_$s" ;;
        *) die "unknown scenario $s" ;;
    esac
done
cut -d' ' -f1-3 /proc/loadavg >"$RESULTS_DIR/load_after.txt"
log "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"

{
    echo "date=$STAMP"
    echo "command=benches/run.sh (DURATION=$DURATION ROUNDS=$ROUNDS CLIENTS=\"$CLIENTS\" MODES=\"$MODES\" ENC_CLIENTS=\"$ENC_CLIENTS\" BULK_ROWS=$BULK_ROWS BULK_VALUES=\"$BULK_VALUES\" ORGS=$ORGS IDLE_CONNS=$IDLE_CONNS SEARCH_ROWS=$SEARCH_ROWS SEARCH_MODES=\"$SEARCH_MODES\" SCENARIOS=\"$SCENARIOS\")"
    echo "commit=$(cd "$REPO_DIR" && git rev-parse --short HEAD)$(cd "$REPO_DIR" && git diff --quiet HEAD -- src || echo '+dirty')"
    echo "nproc=$NCPU"
    echo "cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)"
    echo "ram_gib=$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)"
    echo "postgres=$("$PG_BINDIR/postgres" --version)"
    echo "pgbouncer=$("$PGBOUNCER" --version | head -n1)"
    echo "load_before=$(cat "$RESULTS_DIR/load_before.txt")"
    echo "load_after=$(cat "$RESULTS_DIR/load_after.txt")"
} >"$RESULTS_DIR/machine.txt"
rm -f "$RESULTS_DIR/load_before.txt" "$RESULTS_DIR/load_after.txt"

PY=python3
if [ "${NO_CHART:-}" != 1 ]; then
    VENV=${BENCH_VENV:-$HOME/.cache/pgenvelope/bench-venv}
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
        log "installing matplotlib into $VENV"
        if ! { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q matplotlib >&2; }; then
            log "WARNING: could not install matplotlib: no chart"
        fi
    fi
    "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null && PY=$VENV/bin/python
fi
"$PY" "$REPO_DIR/benches/report.py" "$RESULTS_DIR"
log "results in $RESULTS_DIR (summary.csv, summary.md, chart.png, raw.csv, machine.txt)"
