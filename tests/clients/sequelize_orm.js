// A small multi-tenant Sequelize 6 app, run against DATABASE_URL (through pgenvelope in the
// tests). `customer.email`, `customer.ssn` and `customer.notes` are encrypted per `org_id` (an
// integer, or a UUID with ORG_TYPE=uuid). Every ordinary ORM write and read is run once,
// unchanged, and the values read back are compared with what was written; the last line
// printed is `ok`.
//
// Environment: DATABASE_URL, TABLE (the table name), ORG_TYPE (int | uuid), TENANT_MODE (none:
// the rows name their organisation; session: set_config('pgenvelope.tenant', …) on every new
// connection as well), ROW_KEY (`id` when the table binds values to their row).
'use strict';

const { Sequelize, DataTypes } = require('sequelize');

const table = process.env.TABLE || 'customer';
const orgType = process.env.ORG_TYPE || 'int';
const tenantMode = process.env.TENANT_MODE || 'none';
const rowBound = process.env.ROW_KEY === 'id';

function org(n) {
  if (orgType === 'uuid') {
    // One organisation in sixteen has a UUID starting with 0.
    return `0${n.toString(16).padStart(7, '0')}-9c0b-4ef8-bb6d-6bb9bd380a11`;
  }
  return 3000 + n;
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
  let tenant = acme;
  const sequelize = new Sequelize(process.env.DATABASE_URL, {
    logging: false,
    pool: { max: 1, min: 0 },
    hooks: {
      afterConnect: async (connection) => {
        if (tenantMode === 'session') {
          await connection.query("SELECT set_config('pgenvelope.tenant', $1, false)", [String(tenant)]);
        }
      },
    },
  });
  const Customer = sequelize.define(
    'Customer',
    {
      id: { type: DataTypes.BIGINT, primaryKey: true, autoIncrement: true },
      org_id: { type: orgType === 'uuid' ? DataTypes.UUID : DataTypes.BIGINT, allowNull: false },
      name: { type: DataTypes.TEXT, allowNull: false },
      email: { type: DataTypes.TEXT },
      ssn: { type: DataTypes.TEXT },
      notes: { type: DataTypes.TEXT },
    },
    { tableName: table, timestamps: false },
  );
  // create
  const a = await Customer.create({ org_id: acme, name: 'a', email: 'a@acme.example', ssn: '111-22-3333' });
  // save of one field
  a.notes = 'vip';
  await a.save({ fields: ['notes'] });
  // update by primary key
  await Customer.update({ ssn: '999-88-7777' }, { where: { id: a.id } });
  // update of a loaded instance
  await a.update({ email: 'a2@acme.example' });
  // bulk create
  const made = await Customer.bulkCreate(
    [0, 1, 2].map((i) => ({ org_id: acme, name: `b${i}`, email: `b${i}@acme.example` })),
    { returning: true },
  );
  // upsert (INSERT … ON CONFLICT (id) DO UPDATE SET … RETURNING)
  await Customer.upsert({ id: made[0].id, org_id: acme, name: 'b0', email: 'b0-new@acme.example', notes: 'note 0' });
  // bulk create with updateOnDuplicate
  await Customer.bulkCreate(
    [1, 2].map((i) => ({ id: made[i].id, org_id: acme, name: `b${i}`, email: `b${i}-new@acme.example`, notes: `note ${i}` })),
    { updateOnDuplicate: ['email', 'notes'] },
  );
  // findOrCreate: an INSERT wrapped in a temporary function (refused on row-bound tables,
  // whose values it could not read back)
  try {
    const [z, created] = await Customer.findOrCreate({
      where: { name: 'z' },
      defaults: { org_id: acme, email: 'z@acme.example' },
    });
    check([rowBound, created, z.email], [false, true, 'z@acme.example'], 'findOrCreate');
    const [z2, again] = await Customer.findOrCreate({ where: { name: 'z' }, defaults: { org_id: acme } });
    check([again, z2.email, z2.id], [false, 'z@acme.example', z.id], 'findOrCreate again');
  } catch (e) {
    if (!rowBound || !String(e.message).includes('findOrCreate')) throw e;
  }
  // read back
  const a2 = await Customer.findByPk(a.id);
  check([a2.email, a2.ssn, a2.notes], ['a2@acme.example', '999-88-7777', 'vip'], 'a');
  for (let i = 0; i < 3; i++) {
    const c = await Customer.findByPk(made[i].id);
    check([c.email, c.notes], [`b${i}-new@acme.example`, `note ${i}`], `b${i}`);
  }
  const found = await Customer.findAll({ where: { org_id: acme }, order: [['id', 'ASC']] });
  check(found.length, rowBound ? 4 : 5, 'findAll');
  // another organisation, in a transaction (a new pooled connection gets the new tenant)
  tenant = globex;
  await sequelize.connectionManager.pool.destroyAllNow();
  const g = await sequelize.transaction(async (t) => {
    const g = await Customer.create({ org_id: globex, name: 'g', email: 'g@globex.example' }, { transaction: t });
    g.notes = 'globex note';
    await g.save({ transaction: t });
    return g;
  });
  const g2 = await Customer.findByPk(g.id);
  check([g2.email, g2.notes], ['g@globex.example', 'globex note'], 'g');
  // delete
  await Customer.destroy({ where: { id: g.id } });
  check(await Customer.count({ where: { id: g.id } }), 0, 'deleted');
  await sequelize.close();
  console.log('ok');
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  if (e && e.sql) console.error('SQL:', e.sql);
  process.exit(1);
});
