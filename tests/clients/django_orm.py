"""A small multi-tenant Django app, run against DATABASE_URL (through pgenvelope in the tests).

`customer.email`, `customer.ssn` and `customer.notes` are encrypted per `org_id` (an integer,
or a UUID with ORG_TYPE=uuid). Every ordinary ORM write and read is run once, unchanged, and the
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
    print("ok")


if __name__ == "__main__":
    main()
