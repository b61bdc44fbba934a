#!/usr/bin/env python3
"""Client-driver smoke test with psycopg 3.

Connects to DATABASE_URL (directly to PostgreSQL or through pgenvelope) and exercises what this
driver does on the wire: simple and extended protocol, server-side prepared statements, binary
results, COPY both ways, LISTEN/NOTIFY, error recovery, transactions and non-ASCII text.

Prints `ok` as its last line and exits 0 on success; exits 1 with a message otherwise.
"""

import os
import sys
import uuid

import psycopg
from psycopg import errors, sql


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL is not set")

    table = f"psycopg_smoke_{uuid.uuid4().hex[:12]}"
    channel = f"psycopg_chan_{uuid.uuid4().hex[:12]}"
    t = sql.Identifier(table)
    text_sample = "Grüße, 日本語, emoji 🐘, quote ' and backslash \\"

    with psycopg.connect(url, autocommit=True) as conn:
        conn.prepare_threshold = 0
        try:
            run(conn, t, channel, text_sample, url)
        finally:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))


def run(conn, t, channel, text_sample, url):
    # DDL (simple protocol).
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, name text NOT NULL, "
            "amount numeric(10,2), data bytea, created timestamptz DEFAULT now())"
        ).format(t)
    )

    # Parameterised inserts as server-side prepared statements, reused.
    insert = sql.SQL("INSERT INTO {} (id, name, amount, data) VALUES (%s, %s, %s, %s)").format(t)
    with conn.cursor() as cur:
        for i in range(1, 6):
            cur.execute(insert, (i, f"name-{i}", i * 1.5, bytes([i, 0, 255])), prepare=True)
        cur.execute(insert, (6, text_sample, None, None), prepare=True)

    # Parameterised select, prepared.
    select = sql.SQL("SELECT id, name, amount FROM {} WHERE id = %s").format(t)
    with conn.cursor() as cur:
        for i in (2, 3, 2):
            cur.execute(select, (i,), prepare=True)
            row = cur.fetchone()
            check(row is not None and row[0] == i and row[1] == f"name-{i}", f"select {i}: {row}")
        cur.execute(sql.SQL("SELECT name FROM {} WHERE id = %s").format(t), (6,), prepare=True)
        check(cur.fetchone()[0] == text_sample, "non-ASCII text round trip (text format)")

    # executemany (pipelined in psycopg 3).
    with conn.cursor() as cur:
        cur.executemany(insert, [(i, f"many-{i}", i, None) for i in range(100, 120)])
        cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE id >= 100").format(t))
        check(cur.fetchone()[0] == 20, "executemany count")

    # Binary results.
    with conn.cursor(binary=True) as cur:
        cur.execute(sql.SQL("SELECT id, name, data, amount FROM {} WHERE id = %s").format(t), (1,))
        row = cur.fetchone()
        check(row[0] == 1 and row[1] == "name-1", f"binary row {row}")
        check(bytes(row[2]) == bytes([1, 0, 255]), f"binary bytea {row[2]!r}")
        check(str(row[3]) == "1.50", f"binary numeric {row[3]}")
        cur.execute(sql.SQL("SELECT name FROM {} WHERE id = 6").format(t))
        check(cur.fetchone()[0] == text_sample, "non-ASCII text round trip (binary format)")

    # Transaction rolled back, then committed.
    with conn.transaction(force_rollback=True):
        conn.execute(sql.SQL("DELETE FROM {}").format(t))
        check(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone()[0] == 0,
              "delete visible inside transaction")
    count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone()[0]
    check(count == 26, f"rollback restored rows, got {count}")
    with conn.transaction():
        conn.execute(sql.SQL("UPDATE {} SET amount = 0 WHERE id = 1").format(t))
    amount = conn.execute(sql.SQL("SELECT amount FROM {} WHERE id = 1").format(t)).fetchone()[0]
    check(amount == 0, "commit kept update")

    # COPY FROM STDIN and COPY TO STDOUT (text), and binary COPY out.
    copied = [(200 + i, f"copy-{i} ünï", None, None) for i in range(50)]
    with conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} (id, name, amount, data) FROM STDIN").format(t)) as copy:
            for row in copied:
                copy.write_row(row)
        check(cur.rowcount == 50, f"copy in rowcount {cur.rowcount}")
        out = []
        with cur.copy(sql.SQL("COPY (SELECT id, name FROM {} WHERE id >= 200 ORDER BY id) "
                              "TO STDOUT").format(t)) as copy:
            for row in copy.rows():
                out.append(row)
        check(len(out) == 50 and out[0] == ("200", "copy-0 ünï"), f"copy out {out[:1]}")
        raw = b""
        with cur.copy(sql.SQL("COPY (SELECT id FROM {} WHERE id >= 200) TO STDOUT "
                              "(FORMAT binary)").format(t)) as copy:
            for chunk in copy:
                raw += bytes(chunk)
        check(raw.startswith(b"PGCOPY\n\xff\r\n\x00"), "binary copy signature")

    # LISTEN/NOTIFY round trip: notification sent from a second connection.
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SELECT pg_notify(%s, %s)", (channel, "héllo"))
    got = None
    for n in conn.notifies(timeout=10, stop_after=1):
        got = n
    check(got is not None and got.channel == channel and got.payload == "héllo",
          f"notification {got}")
    conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))

    # A server error, simple and extended protocol; the connection must stay usable.
    try:
        conn.execute("SELECT 1/0")
        check(False, "division by zero should fail")
    except errors.DivisionByZero:
        pass
    try:
        conn.execute("SELECT %s::int / 0", (1,), prepare=True)
        check(False, "division by zero should fail")
    except errors.DivisionByZero:
        pass
    try:
        with conn.transaction():
            conn.execute(sql.SQL("INSERT INTO {} (id, name) VALUES (1, 'dup')").format(t))
    except errors.UniqueViolation:
        pass
    check(conn.execute("SELECT 42").fetchone()[0] == 42, "connection usable after errors")

    # Non-ASCII text as a parameter in both directions.
    echoed = conn.execute("SELECT %s::text", (text_sample,), prepare=True).fetchone()[0]
    check(echoed == text_sample, "non-ASCII parameter echo")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report anything as a failure
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print("ok")
