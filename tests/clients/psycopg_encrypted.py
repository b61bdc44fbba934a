"""Writes and reads an encrypted table through pgenvelope with psycopg 3.

Env: DATABASE_URL (through the proxy), TABLE (a vault table: org_id, name, value, note).
Uses client-side literals (psycopg's default for execute without prepare), server-side
prepared statements, binary results, executemany (pipelined) and COPY in and out.
Prints `ok` last on success.
"""
import os
import sys

import psycopg

url = os.environ["DATABASE_URL"]
table = os.environ["TABLE"]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


with psycopg.connect(url, autocommit=True) as conn:
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} (org_id, name, value) VALUES (%s, %s, %s)", ("py", "a", "psycopg-secret"))
    cur.execute(
        f"INSERT INTO {table} (org_id, name, value, note) VALUES (%s, %s, %s, %s)",
        ("py", "b", "prepared-secret", "ñoté"),
        prepare=True,
    )
    cur.executemany(
        f"INSERT INTO {table} (org_id, name, value) VALUES (%s, %s, %s)",
        [("py", f"m{i}", f"many-{i}") for i in range(20)],
    )
    with cur.copy(f"COPY {table} (org_id, name, value) FROM STDIN") as copy:
        for i in range(5):
            copy.write_row(("py", f"c{i}", f"copied-{i}"))

    cur.execute(f"SELECT name, value, note FROM {table} WHERE name IN ('a', 'b') ORDER BY name")
    rows = cur.fetchall()
    check(rows == [("a", "psycopg-secret", None), ("b", "prepared-secret", "ñoté")], f"rows {rows!r}")

    bcur = conn.cursor(binary=True)
    bcur.execute(f"SELECT value FROM {table} WHERE name = %s", ("m7",))
    check(bcur.fetchone() == ("many-7",), "binary result")

    with conn.transaction():
        named = conn.cursor(name="enc_cursor")
        named.execute(f"SELECT name, value FROM {table} WHERE org_id = 'py' AND name LIKE 'c%%'")
        got = sorted(named.fetchall())
        check(got == [(f"c{i}", f"copied-{i}") for i in range(5)], f"cursor {got!r}")

    out = []
    with cur.copy(f"COPY (SELECT value FROM {table} WHERE name = 'c3') TO STDOUT") as copy:
        for row in copy.rows():
            out.append(row)
    check(out == [("copied-3",)], f"copy out {out!r}")

    try:
        cur.execute(f"SELECT * FROM {table} WHERE value = %s", ("x",))
        check(False, "comparison on an encrypted column was not refused")
    except psycopg.errors.FeatureNotSupported as e:
        check("pgenvelope:" in str(e), f"message {e}")
    cur.execute("SELECT 1")
    check(cur.fetchone() == (1,), "usable after refusal")

print("ok")
