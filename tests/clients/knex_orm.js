// A small multi-tenant Knex 3 app, run against DATABASE_URL (through pgenvelope in the tests).
// `customer.email`, `customer.ssn` and `customer.notes` are encrypted per `org_id` (an integer,
// or a UUID with ORG_TYPE=uuid). Every ordinary query-builder write and read is run once,
// unchanged, and the values read back are compared with what was written; the last line
// printed is `ok`.
//
// Environment: DATABASE_URL, TABLE (the table name), ORG_TYPE (int | uuid), TENANT_MODE (none:
// the rows name their organisation; session: set_config('pgenvelope.tenant', …) on every new
// connection as well).
'use strict';

const knexFactory = require('knex');

const table = process.env.TABLE || 'customer';
const orgType = process.env.ORG_TYPE || 'int';
const tenantMode = process.env.TENANT_MODE || 'none';

function org(n) {
  if (orgType === 'uuid') {
    return `0${n.toString(16).padStart(7, '0')}-9c0b-4ef8-bb6d-6bb9bd380a11`;
  }
  return 4000 + n;
}

function check(got, want, what) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) {
    console.log(`MISMATCH ${what}: ${g} != ${w}`);
    process.exit(1);
  }
}

async function main() {
  const acme = org(1);
  const globex = org(2);
  // One pool per organisation: each new connection sets its tenant (TENANT_MODE=session).
  const connect = (tenant) =>
    knexFactory({
      client: 'pg',
      connection: process.env.DATABASE_URL,
      pool: {
        min: 0,
        max: 1,
        afterCreate: (conn, done) => {
          if (tenantMode !== 'session') return done(null, conn);
          conn.query("SELECT set_config('pgenvelope.tenant', $1, false)", [String(tenant)], (err) => done(err, conn));
        },
      },
    });
  const knex = connect(acme);
  const id = (row) => (typeof row === 'object' ? row.id : row);
  // insert … returning id
  const [a] = await knex(table).insert({ org_id: acme, name: 'a', email: 'a@acme.example', ssn: '111-22-3333' }).returning('id');
  // update by primary key
  await knex(table).where({ id: id(a) }).update({ notes: 'vip' });
  await knex(table).where('id', id(a)).update({ ssn: '999-88-7777', email: 'a2@acme.example' });
  // multi-row insert; rows with different columns get DEFAULT
  const made = await knex(table)
    .insert([
      { org_id: acme, name: 'b0', email: 'b0@acme.example' },
      { org_id: acme, name: 'b1', email: 'b1@acme.example', notes: 'n1' },
      { org_id: acme, name: 'b2', ssn: '222-33-4444' },
    ])
    .returning(['id']);
  // upsert
  await knex(table)
    .insert({ id: id(made[0]), org_id: acme, name: 'b0', email: 'b0-new@acme.example', notes: 'note 0' })
    .onConflict('id')
    .merge();
  await knex(table)
    .insert({ id: id(made[1]), org_id: acme, name: 'b1', email: 'b1-new@acme.example', notes: 'note 1' })
    .onConflict('id')
    .merge(['email', 'notes']);
  // read back
  const a2 = await knex(table).where({ id: id(a) }).first();
  check([a2.email, a2.ssn, a2.notes], ['a2@acme.example', '999-88-7777', 'vip'], 'a');
  const b = await knex(table).whereIn('id', made.map(id)).orderBy('id');
  check(
    b.map((r) => [r.email, r.ssn, r.notes]),
    [
      ['b0-new@acme.example', null, 'note 0'],
      ['b1-new@acme.example', null, 'note 1'],
      [null, '222-33-4444', null],
    ],
    'b',
  );
  // another organisation, in a transaction
  await knex.destroy();
  const other = connect(globex);
  const gid = await other.transaction(async (trx) => {
    const [g] = await trx(table).insert({ org_id: globex, name: 'g', email: 'g@globex.example' }).returning('id');
    await trx(table).where({ id: id(g) }).update({ notes: 'globex note' });
    return id(g);
  });
  const g = await other(table).where({ id: gid }).first();
  check([g.email, g.notes], ['g@globex.example', 'globex note'], 'g');
  // delete
  await other(table).where({ id: gid }).del();
  check((await other(table).where({ id: gid })).length, 0, 'deleted');
  await other.destroy();
  console.log('ok');
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
