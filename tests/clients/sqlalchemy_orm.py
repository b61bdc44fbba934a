"""A small multi-tenant SQLAlchemy 2 app, run against DATABASE_URL (through pgenvelope in the
tests), with psycopg 3 or asyncpg.

`customer.email`, `customer.ssn` and `customer.notes` are encrypted per `org_id` (an integer, or
a UUID with ORG_TYPE=uuid). Every ordinary ORM write and read is run once, unchanged, and the
values read back are compared with what was written; the last line printed is `ok`.

Environment: DATABASE_URL, TABLE, ORG_TYPE (int | uuid), DRIVER (psycopg | asyncpg),
TENANT_MODE (none | session: SET pgenvelope.tenant per connection as well).
"""

import asyncio
import os
import sys
import uuid

from sqlalchemy import BigInteger, Text, Uuid, create_engine, delete, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

url = os.environ["DATABASE_URL"].split("://", 1)[1]
table = os.environ.get("TABLE", "customer")
org_type = os.environ.get("ORG_TYPE", "int")
driver = os.environ.get("DRIVER", "psycopg")
tenant_mode = os.environ.get("TENANT_MODE", "none")


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = table
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    if org_type == "uuid":
        org_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    else:
        org_id: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    ssn: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str | None] = mapped_column(Text)


def org(n):
    if org_type == "uuid":
        return uuid.UUID(f"0{n:07x}-9c0b-4ef8-bb6d-6bb9bd380a11")
    return 2000 + n


def check(got, want, what):
    if got != want:
        print(f"MISMATCH {what}: {got!r} != {want!r}")
        sys.exit(1)


def run(session):
    acme, globex = org(1), org(2)
    if tenant_mode == "session":
        session.execute(text("SET pgenvelope.tenant = '%s'" % acme))
    # create one, then several at once (insertmanyvalues with RETURNING)
    a = Customer(org_id=acme, name="a", email="a@acme.example", ssn="111-22-3333")
    session.add(a)
    session.flush()
    many = [Customer(org_id=acme, name=f"b{i}", email=f"b{i}@acme.example") for i in range(3)]
    session.add_all(many)
    session.flush()
    # unit of work: change one field, flush (UPDATE … WHERE id = …)
    a.notes = "vip"
    session.flush()
    # update by primary key, as a statement
    session.execute(update(Customer).where(Customer.id == a.id).values(ssn="999-88-7777"))
    # bulk update by primary key (executemany)
    session.execute(
        update(Customer),
        [{"id": c.id, "notes": f"note {i}"} for i, c in enumerate(many)],
    )
    # upsert on the primary key
    stmt = pg_insert(Customer).values(id=a.id, org_id=acme, name="a", email="a3@acme.example")
    stmt = stmt.on_conflict_do_update(
        index_elements=[Customer.id], set_={"email": stmt.excluded.email}
    )
    session.execute(stmt)
    # merge: SELECT by key, then UPDATE of what changed
    session.merge(
        Customer(id=many[0].id, org_id=acme, name="b0", email="b0-merged@acme.example", notes="note 0")
    )
    session.commit()
    session.expire_all()
    a = session.get(Customer, a.id)
    check((a.email, a.ssn, a.notes), ("a3@acme.example", "999-88-7777", "vip"), "a")
    for i, c in enumerate(many):
        c = session.get(Customer, c.id)
        email = "b0-merged@acme.example" if i == 0 else f"b{i}@acme.example"
        check((c.email, c.notes), (email, f"note {i}"), f"b{i}")
    # another organisation
    if tenant_mode == "session":
        session.execute(text("SET pgenvelope.tenant = '%s'" % globex))
    g = Customer(org_id=globex, name="g", email="g@globex.example")
    session.add(g)
    session.flush()
    g.notes = "globex note"
    session.commit()
    session.expire_all()
    g = session.get(Customer, g.id)
    check((g.email, g.notes), ("g@globex.example", "globex note"), "g")
    session.execute(delete(Customer).where(Customer.id == g.id))
    session.commit()
    check(session.scalar(select(Customer).where(Customer.id == g.id)), None, "deleted")
    # look-ups by value on the searchable e-mail column (`search = "equality"`)
    if tenant_mode == "session":
        session.execute(text("SET pgenvelope.tenant = '%s'" % acme))
    found = session.scalars(
        select(Customer).where(Customer.org_id == acme, Customer.email == "a3@acme.example")
    ).all()
    check([c.id for c in found], [a.id], "where(email ==)")
    found = session.scalars(
        select(Customer)
        .where(Customer.org_id == acme, Customer.email.in_(["b1@acme.example", "b2@acme.example"]))
        .order_by(Customer.id)
    ).all()
    check([c.id for c in found], [many[1].id, many[2].id], "where(email.in_)")
    session.commit()


def main():
    if driver == "asyncpg":
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        async def go():
            engine = create_async_engine("postgresql+asyncpg://" + url)
            async with AsyncSession(engine) as session:
                await session.run_sync(lambda s: run(s))
            await engine.dispose()

        asyncio.run(go())
    else:
        engine = create_engine("postgresql+psycopg://" + url)
        with Session(engine) as session:
            run(session)
        engine.dispose()
    print("ok")


if __name__ == "__main__":
    main()
