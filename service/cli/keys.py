"""``docqueue keys``: API keys, made here because only an operator with database access may."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from service.cli.output import err, fail, out, print_json
from service.errors import BadInputError

app = typer.Typer(help="API keys (stored hashed; shown once).", no_args_is_help=True)


@app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if it does not exist.")],
    admin: Annotated[
        bool,
        typer.Option(
            "--admin", help="An admin key: sees every tenant's jobs, usage, workers and queues."
        ),
    ] = False,
) -> None:
    """Create an API key for TENANT and print it (the only time it is shown)."""
    from service.store.engine import session_scope
    from service.store.keys import create_key

    try:
        with session_scope() as session:
            key = create_key(session, tenant, admin=admin)
    except Exception as exc:
        fail(f"could not create a key: {exc}")
    # The key alone on stdout, so `KEY=$(docqueue keys create ...)` captures just the key.
    what = "Admin API key" if admin else "API key"
    err.print(f"{what} for tenant {tenant!r} (store it now; it is not shown again):")
    out.print(key, highlight=False)


def _when(instant: datetime | None) -> str:
    """An instant in UTC to the second, or nothing."""
    return instant.astimezone(UTC).isoformat(timespec="seconds") if instant is not None else ""


@app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List API keys by prefix and id (never the key itself), oldest first."""
    from service.store.engine import session_scope
    from service.store.keys import list_keys

    try:
        with session_scope() as session:
            keys = list_keys(session, tenant)
    except BadInputError as exc:
        fail(exc.message)
    except Exception as exc:
        fail(f"could not list keys: {exc}")
    if as_json:
        print_json(
            [
                {
                    "id": str(k.id),
                    "prefix": k.prefix,
                    "tenant": k.tenant,
                    "created_at": _when(k.created_at),
                    "revoked_at": _when(k.revoked_at) or None,
                    "admin": k.admin,
                }
                for k in keys
            ]
        )
        return
    table = Table("prefix", "tenant", "scope", "created (UTC)", "revoked (UTC)")
    table.add_column("id", no_wrap=True)
    for k in keys:
        # Text, not markup: a tenant's name is whatever its creator typed.
        scope = "admin" if k.admin else "tenant"
        cells = (k.prefix, k.tenant, scope, _when(k.created_at), _when(k.revoked_at), str(k.id))
        table.add_row(*(Text(c) for c in cells))
    out.print(table)


@app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's prefix (dq_...) or id, from `keys list`.")],
) -> None:
    """Revoke an API key: it is refused (401) from its next request on."""
    from service.store.engine import session_scope
    from service.store.keys import revoke_key

    try:
        with session_scope() as session:
            info, revoked_now = revoke_key(session, key)
    except BadInputError as exc:
        fail(exc.message)
    except Exception as exc:
        fail(f"could not revoke the key: {exc}")
    what = "revoked" if revoked_now else "was already revoked"
    out.print(
        f"key {info.prefix} ({info.id}) of tenant {info.tenant!r} {what} at "
        f"{_when(info.revoked_at)}",
        highlight=False,
        markup=False,
    )
