"""``docqueue keys``: API keys, made here because only an operator with database access may."""

from __future__ import annotations

from typing import Annotated

import typer

from service.cli.output import err, fail, out

app = typer.Typer(help="API keys (stored hashed; shown once).", no_args_is_help=True)


@app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if it does not exist.")],
) -> None:
    """Create an API key for TENANT and print it (the only time it is shown)."""
    from service.store.engine import session_scope
    from service.store.keys import create_key

    try:
        with session_scope() as session:
            key = create_key(session, tenant)
    except Exception as exc:
        fail(f"could not create a key: {exc}")
    # The key alone on stdout, so `KEY=$(docqueue keys create ...)` captures just the key.
    err.print(f"API key for tenant {tenant!r} (store it now; it is not shown again):")
    out.print(key, highlight=False)
