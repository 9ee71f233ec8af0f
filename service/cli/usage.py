"""``docqueue usage`` (a tenant's usage and quotas) and the admin commands over HTTP:
``docqueue quotas show|set``, ``docqueue tenants``, ``docqueue workers``, ``docqueue queues``.

Like the job commands they need only the API and a key; the admin ones an admin key
(``docqueue keys create --admin``), else the API answers 403 and the command says so.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from service.cli.output import api_client, fail, out, print_json

#: Merged into the root app (``usage``, ``tenants``, ``workers``, ``queues``).
app = typer.Typer()
quotas_app = typer.Typer(help="Tenants' quotas (admin key).", no_args_is_help=True)

#: The quotas, as the API names them, and their option names here.
QUOTAS = ("running_jobs", "queued_rows", "upload_bytes_per_day", "output_tokens_per_day")


def _quota_table(quotas: dict[str, Any]) -> Table:
    table = Table("quota")
    for column in ("limit", "used"):
        table.add_column(column, justify="right")
    table.add_column("limit set by")
    for name, q in quotas.items():
        whose = "default" if q["default"] else "tenant's own"
        table.add_row(name, f"{q['limit']:,}", f"{q['used']:,}", whose)
    return table


@app.command()
def usage(
    start: Annotated[
        str | None, typer.Option("--from", help="First UTC day (YYYY-MM-DD); default 30 days.")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="Last UTC day, included; default today.")
    ] = None,
    group_by: Annotated[str, typer.Option(help="day, model or day,model")] = "day,model",
    tenant: Annotated[
        str | None, typer.Option(help="Admin key: this tenant (default: all tenants).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Documents, prompt and output tokens and upload bytes by UTC day and model; quotas."""
    with api_client() as client:
        body = client.usage(**{"from": start, "to": end, "group_by": group_by, "tenant": tenant})
    if as_json:
        print_json(body)
        return
    groups: list[str] = list(body["group_by"])
    if body["tenant"] is None:
        groups.append("tenant")
    table = Table(*groups)
    for column in ("documents", "failed", "prompt tokens", "output tokens", "uploaded bytes"):
        table.add_column(column, justify="right")
    numbers = ("documents", "failed", "prompt_tokens", "output_tokens", "upload_bytes")
    for row in body["data"]:
        # Text, not markup: model and tenant names are whatever their creators typed.
        keys = [Text(str(row[g])) for g in groups]
        table.add_row(*keys, *(f"{row[n]:,}" for n in numbers))
    totals = body["totals"]
    table.add_row(
        "total", *([""] * (len(groups) - 1)), *(f"{totals[n]:,}" for n in numbers), style="bold"
    )
    who = body["tenant"] if body["tenant"] is not None else "all tenants"
    out.print(Text(f"usage of {who}, {body['from']} to {body['to']} (UTC)"))
    out.print(table)
    if body.get("quotas"):
        out.print(_quota_table(body["quotas"]))


@quotas_app.command("show")
def quotas_show(
    tenant: Annotated[str, typer.Argument(help="Tenant name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """A tenant's quotas (its own, or the defaults) and their use."""
    with api_client() as client:
        body = client.quotas(tenant)
    if as_json:
        print_json(body)
        return
    out.print(_quota_table(body["quotas"]))


@quotas_app.command("set")
def quotas_set(
    tenant: Annotated[str, typer.Argument(help="Tenant name.")],
    running_jobs: Annotated[int | None, typer.Option(min=1, help="Jobs open at once.")] = None,
    queued_rows: Annotated[
        int | None, typer.Option(min=1, help="Rows of open jobs without a result.")
    ] = None,
    upload_bytes_per_day: Annotated[
        int | None, typer.Option(min=1, help="Bytes uploaded per UTC day.")
    ] = None,
    output_tokens_per_day: Annotated[
        int | None, typer.Option(min=1, help="Output tokens per UTC day.")
    ] = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(help="Back to the default: a quota's name (repeatable)."),
    ] = None,
) -> None:
    """Set a tenant's own quotas (the others keep theirs); --reset NAME restores a default."""
    body: dict[str, int | None] = {
        name: value
        for name, value in (
            ("running_jobs", running_jobs),
            ("queued_rows", queued_rows),
            ("upload_bytes_per_day", upload_bytes_per_day),
            ("output_tokens_per_day", output_tokens_per_day),
        )
        if value is not None
    }
    for name in reset or []:
        name = name.replace("-", "_")
        if name not in QUOTAS:
            fail(f"unknown quota {name!r}; one of: {', '.join(QUOTAS)}")
        body[name] = None
    if not body:
        fail("nothing to set: name a quota (--running-jobs ...) or --reset NAME")
    with api_client() as client:
        result = client.set_quotas(tenant, body)
    out.print(Text(f"quotas of tenant {result['name']!r}:"))
    out.print(_quota_table(result["quotas"]))


@app.command()
def tenants(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Every tenant with its quotas and their use (admin key)."""
    with api_client() as client:
        body = client.tenants()
    if as_json:
        print_json(body)
        return
    table = Table("tenant", *QUOTAS)
    for t in body["data"]:
        cells = [f"{t['quotas'][q]['used']:,} / {t['quotas'][q]['limit']:,}" for q in QUOTAS]
        table.add_row(Text(t["name"]), *cells)
    out.print(table)


@app.command()
def workers(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Registered workers: host, device, model, heartbeat (admin key)."""
    with api_client() as client:
        body = client.workers()
    if as_json:
        print_json(body)
        return
    table = Table("worker", "model", "device", "slots", "live", "last heartbeat")
    for w in body["data"]:
        table.add_row(
            Text(w["name"]),
            Text(w["model"]),
            Text(w["device"]),
            str(w["slots"]),
            "yes" if w["live"] else "no",
            w["last_heartbeat_at"][:19],
        )
    out.print(table)


@app.command()
def queues(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Per model: chunks waiting, released to Redis and running; open jobs (admin key)."""
    with api_client() as client:
        body = client.queues()
    if as_json:
        print_json(body)
        return
    table = Table("model", "waiting", "released", "leased", "open jobs", "live workers")
    for q in body["data"]:
        table.add_row(
            Text(q["model"]),
            *(str(q[k]) for k in ("waiting", "released", "leased", "open_jobs", "live_workers")),
        )
    out.print(table)
