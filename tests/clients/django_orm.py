"""A small multi-tenant Django app, run against DATABASE_URL (through pgenvelope in the tests).

`customer.email`, `customer.ssn`, `customer.notes` and `customer.code` are encrypted per
`org_id` (an integer, or a UUID with ORG_TYPE=uuid); `email` is searchable (`equality`) and
`code` case-insensitively (`equality-ci`). Every ordinary ORM write and read is run once, unchanged, and the
values read back are compared with what was written; the last line printed is `ok`.

Environment: DATABASE_URL, TABLE (the table name), ORG_TYPE (int | uuid), TENANT_MODE (none:
the rows name their organisation; session: set_config('pgenvelope.tenant', …) per connection as well),
BINDING (client | server: Django's client-side or server-side parameter binding).
"""

import os
import sys
import urllib.parse
import uuid

import django
from django.conf import settings

url = urllib.parse.urlparse(os.environ["DATABASE_URL"])
table = os.environ.get("TABLE", "customer")
org_type = os.environ.get("ORG_TYPE", "int")
tenant_mode = os.environ.get("TENANT_MODE", "none")
binding = os.environ.get("BINDING", "client")

settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path.lstrip("/"),
            "USER": url.username or "postgres",
            "PASSWORD": url.password or "",
            "HOST": url.hostname,
            "PORT": url.port,
            "OPTIONS": {"server_side_binding": binding == "server"},
        }
    },
    INSTALLED_APPS=["django.contrib.contenttypes"],
    USE_TZ=True,
)
django.setup()

from django.db import connection, models, transaction  # noqa: E402


class Customer(models.Model):
    if org_type == "uuid":
        org_id = models.UUIDField()
    else:
        org_id = models.BigIntegerField()
    name = models.TextField()
    email = models.TextField(null=True)
    ssn = models.TextField(null=True)
    notes = models.TextField(null=True)
    code = models.TextField(null=True)

    class Meta:
        app_label = "shop"
        db_table = table


def org(n):
    if org_type == "uuid":
        # One organisation in sixteen has a UUID starting with 0.
        return uuid.UUID(f"0{n:07x}-9c0b-4ef8-bb6d-6bb9bd380a11")
    return 1000 + n


def check(got, want, what):
    if got != want:
        print(f"MISMATCH {what}: {got!r} != {want!r}")
        sys.exit(1)


def set_tenant(o):
    if tenant_mode == "session":
        with connection.cursor() as c:
            c.execute("SELECT set_config('pgenvelope.tenant', %s, false)", [str(o)])


def main():
    acme, globex = org(1), org(2)
    set_tenant(acme)
    # create
    a = Customer.objects.create(org_id=acme, name="a", email="a@acme.example", ssn="111-22-3333")
    # save of one field (update by primary key)
    a.notes = "vip"
    a.save(update_fields=["notes"])
    # save of the whole row
    a.email = "a2@acme.example"
    a.save()
    # filter(pk=…).update(…)
    Customer.objects.filter(pk=a.pk).update(ssn="999-88-7777")
    # bulk create, also with ignore_conflicts
    made = Customer.objects.bulk_create(
        [Customer(org_id=acme, name=f"b{i}", email=f"b{i}@acme.example", notes=None) for i in range(3)]
    )
    Customer.objects.bulk_create(
        [Customer(org_id=acme, name="c", email="c@acme.example")], ignore_conflicts=True
    )
    # bulk update
    for i, c in enumerate(made):
        c.notes = f"note {i}"
        c.email = f"b{i}-new@acme.example"
    Customer.objects.bulk_update(made, ["notes", "email"])
    # update_or_create
    Customer.objects.update_or_create(pk=a.pk, defaults={"notes": "updated"})
    # read back
    a = Customer.objects.get(pk=a.pk)
    check((a.email, a.ssn, a.notes), ("a2@acme.example", "999-88-7777", "updated"), "a")
    for i, c in enumerate(made):
        c = Customer.objects.get(pk=c.pk)
        check((c.email, c.notes), (f"b{i}-new@acme.example", f"note {i}"), f"b{i}")
    # another organisation, in a transaction
    set_tenant(globex)
    with transaction.atomic():
        g = Customer.objects.create(org_id=globex, name="g", email="g@globex.example")
        g.notes = "globex note"
        g.save(update_fields=["notes"])
    g = Customer.objects.get(pk=g.pk)
    check((g.email, g.notes), ("g@globex.example", "globex note"), "g")
    # delete
    Customer.objects.filter(pk=g.pk).delete()
    check(Customer.objects.filter(pk=g.pk).count(), 0, "deleted")
    search(acme, globex)
    print("ok")


def search(acme, globex):
    """Look-ups by value on the searchable columns, as an app writes them."""
    set_tenant(acme)
    s1 = Customer.objects.create(org_id=acme, name="s1", email="find@acme.example", code="AbC-1")
    s2 = Customer.objects.create(org_id=acme, name="s2", email="find@acme.example", code="x")
    set_tenant(globex)
    g = Customer.objects.create(org_id=globex, name="g2", email="find@acme.example", code="abc-1")
    set_tenant(acme)
    scope = {"org_id": acme}
    pks = lambda q: sorted(c.pk for c in q)  # noqa: E731
    check(pks(Customer.objects.filter(email="find@acme.example", **scope)), [s1.pk, s2.pk], "email=")
    check(pks(Customer.objects.filter(code__iexact="aBc-1", **scope)), [s1.pk], "code__iexact")
    check(
        pks(Customer.objects.filter(email__in=["find@acme.example", "none@acme.example"], **scope)),
        [s1.pk, s2.pk],
        "email__in",
    )
    check(
        pks(Customer.objects.filter(**scope).exclude(email="find@acme.example").filter(name__startswith="s")),
        [],
        "exclude(email=)",
    )
    obj, created = Customer.objects.get_or_create(
        email="new@acme.example", org_id=acme, defaults={"name": "s3"}
    )
    check(created, True, "get_or_create creates")
    again, created = Customer.objects.get_or_create(
        email="new@acme.example", org_id=acme, defaults={"name": "s4"}
    )
    check((created, again.pk, again.name), (False, obj.pk, "s3"), "get_or_create finds")
    # Update and delete by value (on a row-bound table an UPDATE must name the row key of
    # the values it writes: update the rows found instead).
    found = Customer.objects.filter(email="find@acme.example", **scope)
    if os.environ.get("ROW_KEY"):
        for c in found:
            c.notes = "found"
            c.save(update_fields=["notes"])
    else:
        found.update(notes="found")
    check(Customer.objects.get(pk=s2.pk).notes, "found", "update by value")
    Customer.objects.filter(code__iexact="X", **scope).delete()
    check(Customer.objects.filter(pk=s2.pk, **scope).count(), 0, "delete by value")
    # The other organisation's equal value is found only under its own tenant.
    set_tenant(globex)
    check(
        pks(Customer.objects.filter(email="find@acme.example", org_id=globex)), [g.pk], "other org"
    )
    set_tenant(acme)


if __name__ == "__main__":
    main()
