#!/usr/bin/env node
// Client-driver smoke test with node-postgres (`pg`).
//
// Connects to DATABASE_URL (directly to PostgreSQL or through pgenvelope) and exercises what
// this driver does on the wire: simple queries, named prepared statements (Parse once, Bind many),
// unnamed extended queries, binary results, transactions, COPY both ways (through the driver's
// submittable interface, no pg-copy-streams needed), LISTEN/NOTIFY, error recovery and non-ASCII text.
//
// Prints `ok` as its last line and exits 0 on success; exits 1 with a message otherwise.
'use strict';

const crypto = require('crypto');
const { Client } = require('pg');

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function expectError(promise, code, what) {
  try {
    await promise;
  } catch (e) {
    check(e.code === code, `${what}: expected SQLSTATE ${code}, got ${e.code} (${e.message})`);
    return;
  }
  throw new Error(`${what}: expected an error`);
}

async function main() {
  const url = process.env.DATABASE_URL;
  if (!url) throw new Error('DATABASE_URL is not set');
  const suffix = crypto.randomBytes(6).toString('hex');
  const table = `pg_smoke_${suffix}`;
  const channel = `pg_chan_${suffix}`;
  const textSample = "Grüße, 日本語, emoji 🐘, quote ' and backslash \\";

  const client = new Client({ connectionString: url });
  await client.connect();
  try {
    await run(client, url, table, channel, textSample);
  } finally {
    await client.query(`DROP TABLE IF EXISTS ${table}`).catch(() => {});
    await client.end();
  }
}

async function run(client, url, table, channel, textSample) {
  // DDL, simple protocol.
  await client.query(
    `CREATE TABLE ${table} (id int PRIMARY KEY, name text NOT NULL, amount numeric(10,2), data bytea)`,
  );

  // Named prepared statement: parsed once, then bound and executed repeatedly.
  for (let i = 1; i <= 5; i++) {
    await client.query({
      name: `ins_${table}`,
      text: `INSERT INTO ${table} (id, name, amount, data) VALUES ($1, $2, $3, $4)`,
      values: [i, `name-${i}`, i * 1.5, Buffer.from([i, 0, 255])],
    });
  }
  await client.query({
    name: `ins_${table}`,
    text: `INSERT INTO ${table} (id, name, amount, data) VALUES ($1, $2, $3, $4)`,
    values: [6, textSample, null, null],
  });
  for (const i of [2, 3, 2]) {
    const r = await client.query({
      name: `sel_${table}`,
      text: `SELECT id, name, amount FROM ${table} WHERE id = $1`,
      values: [i],
    });
    check(r.rows.length === 1 && r.rows[0].id === i && r.rows[0].name === `name-${i}`,
      `select ${i}: ${JSON.stringify(r.rows)}`);
  }

  // Unnamed extended query with non-ASCII text both ways.
  const echo = await client.query('SELECT $1::text AS t, name FROM ' + table + ' WHERE id = $2',
    [textSample, 6]);
  check(echo.rows[0].t === textSample && echo.rows[0].name === textSample, 'non-ASCII round trip');

  // Binary result format (pg-types decodes int, bool and text from binary).
  const bin = await client.query({
    text: `SELECT id, name, id * 7 AS m, id > 0 AS pos FROM ${table} WHERE id = $1`,
    values: [6],
    binary: true,
  });
  check(bin.rows.length === 1, 'binary row count');
  const b = bin.rows[0];
  check(b.id === 6 && b.name === textSample && b.m === 42 && b.pos === true,
    `binary row ${JSON.stringify(b)}`);

  // Rows mode and multiple statements in one simple query.
  const multi = await client.query(`SELECT 1 AS a; SELECT count(*)::int AS n FROM ${table}`);
  check(Array.isArray(multi) && multi[1].rows[0].n === 6, 'multi-statement simple query');

  // Transaction rolled back, then committed.
  await client.query('BEGIN');
  await client.query(`DELETE FROM ${table}`);
  await client.query('ROLLBACK');
  let n = (await client.query(`SELECT count(*)::int AS n FROM ${table}`)).rows[0].n;
  check(n === 6, `rollback restored rows, got ${n}`);
  await client.query('BEGIN');
  await client.query(`UPDATE ${table} SET amount = 0 WHERE id = $1`, [1]);
  await client.query('COMMIT');
  const amt = (await client.query(`SELECT amount FROM ${table} WHERE id = 1`)).rows[0].amount;
  check(amt === '0.00', `commit kept update, got ${amt}`);

  // An error inside a transaction aborts it; ROLLBACK recovers.
  await client.query('BEGIN');
  await expectError(client.query(`INSERT INTO ${table} (id, name) VALUES (1, 'dup')`), '23505',
    'unique violation');
  await expectError(client.query('SELECT 1'), '25P02', 'aborted transaction');
  await client.query('ROLLBACK');

  // Server errors, simple and extended; the connection stays usable.
  await expectError(client.query('SELECT 1/0'), '22012', 'division by zero (simple)');
  await expectError(client.query('SELECT $1::int / 0', [1]), '22012', 'division by zero (extended)');
  await expectError(client.query({ name: `div_${table}`, text: 'SELECT $1::int / 0', values: [1] }),
    '22012', 'division by zero (named)');
  const after = await client.query('SELECT 42 AS x');
  check(after.rows[0].x === 42, 'connection usable after errors');

  // COPY FROM STDIN and COPY TO STDOUT.
  await copyIn(client, `COPY ${table} (id, name) FROM STDIN`,
    Array.from({ length: 50 }, (_, i) => `${200 + i}\tcopy-${i} ünï\n`).join(''));
  n = (await client.query(`SELECT count(*)::int AS n FROM ${table} WHERE id >= 200`)).rows[0].n;
  check(n === 50, `copy in count ${n}`);
  const out = await copyOut(client, `COPY (SELECT id, name FROM ${table} WHERE id >= 200 ORDER BY id) TO STDOUT`);
  const lines = out.toString('utf8').split('\n').filter((l) => l.length > 0);
  check(lines.length === 50 && lines[0] === '200\tcopy-0 ünï', `copy out ${lines[0]}`);

  // LISTEN/NOTIFY round trip, notification from a second connection.
  await client.query(`LISTEN ${channel}`);
  const got = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no notification within 10 s')), 10000);
    client.once('notification', (msg) => {
      clearTimeout(timer);
      resolve(msg);
    });
  });
  const other = new Client({ connectionString: url });
  await other.connect();
  await other.query('SELECT pg_notify($1, $2)', [channel, 'héllo']);
  await other.end();
  const msg = await got;
  check(msg.channel === channel && msg.payload === 'héllo', `notification ${JSON.stringify(msg)}`);
  await client.query(`UNLISTEN ${channel}`);
}

// COPY in both directions through node-postgres' "submittable" interface (what pg-copy-streams
// builds on): the client hands protocol events for the active query to this object.
class CopyQuery {
  constructor(text, data) {
    this.text = text;
    this.data = data;
    this.chunks = [];
    this.error = null;
    this.done = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
  }

  submit(connection) {
    connection.query(this.text);
  }

  handleCopyInResponse(connection) {
    if (this.data === undefined) {
      connection.sendCopyFail('no data for COPY FROM STDIN');
      return;
    }
    connection.sendCopyFromChunk(Buffer.from(this.data, 'utf8'));
    connection.endCopyFrom();
  }

  handleCopyData(msg) {
    this.chunks.push(msg.chunk);
  }

  handleError(err) {
    this.error = err;
  }

  handleReadyForQuery() {
    if (this.error) this.reject(this.error);
    else this.resolve(Buffer.concat(this.chunks));
  }

  handleCommandComplete() {}

  handleRowDescription() {}

  handleDataRow() {}

  handleEmptyQuery() {}

  handlePortalSuspended() {}
}

function copyIn(client, sql, data) {
  return client.query(new CopyQuery(sql, data)).done;
}

function copyOut(client, sql) {
  return client.query(new CopyQuery(sql)).done;
}

main().then(
  () => {
    console.log('ok');
    process.exit(0);
  },
  (e) => {
    console.error(`FAIL: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  },
);
