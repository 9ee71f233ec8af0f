"""``docqueue collections ...`` and ``docqueue schedules ...``: documents kept between jobs and
the cron runs over them.

HTTP client commands like ``submit`` and ``status``: they need only the API and a key, and an
error prints the API's message, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from service.cli.output import api_client, fail, out, print_json

collections_app = typer.Typer(
    help="Collections: documents kept between jobs, with their latest summaries.",
    no_args_is_help=True,
)
schedules_app = typer.Typer(
    help="Schedules: cron runs over a collection's new and changed documents.",
    no_args_is_help=True,
)


# --- collections ------------------------------------------------------------------------------


@collections_app.command("put")
def collections_put(
    name: Annotated[str, typer.Argument(help="Collection name (created on first use).")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    id_column: Annotated[str, typer.Option(help="Column with unique ids.")] = "id",
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    delimiter: Annotated[str | None, typer.Option(help="',' ';' or 'tab'.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Upsert FILE's documents into collection NAME by id; changed texts become pending."""
    fields = {"id_column": id_column, "text_column": text_column, "delimiter": delimiter}
    with api_client() as client:
        res = client.put_documents(name, file, fields)
    if as_json:
        print_json(res)
        return
    up, c = res["upserted"], res["counts"]
    out.print(
        f"collection {res['name']}: {up['inserted']} inserted, {up['updated']} updated, "
        f"{up['unchanged']} unchanged; {c['documents']} documents, {c['pending']} pending"
    )


@collections_app.command("list")
def collections_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Your collections with document, summarized and pending counts."""
    with api_client() as client:
        page = client.collections()
    if as_json:
        print_json(page)
        return
    table = Table("name", "documents", "summarized", "pending", "updated")
    for c in page["data"]:
        n = c["counts"]
        table.add_row(
            c["name"],
            str(n["documents"]),
            str(n["summarized"]),
            str(n["pending"]),
            c["updated_at"][:19],
        )
    out.print(table)


@collections_app.command("remove")
def collections_remove(name: Annotated[str, typer.Argument(help="Collection name.")]) -> None:
    """Delete a collection, its documents and its schedules."""
    with api_client() as client:
        client.delete_collection(name)
    out.print(f"collection {name} deleted")


# --- schedules --------------------------------------------------------------------------------


@schedules_app.command("add")
def schedules_add(
    collection: Annotated[str, typer.Option(help="Collection the schedule runs over.")],
    cron: Annotated[str, typer.Option(help="Five fields, e.g. '0 2 * * *', or @daily.")],
    timezone: Annotated[str, typer.Option(help="IANA zone the cron is read in.")] = "UTC",
    task: Annotated[str, typer.Option(help="summarize | classify | generate")] = "summarize",
    model: Annotated[str | None, typer.Option(help="Model (default: server's).")] = None,
    priority: Annotated[str, typer.Option(help="bulk | interactive")] = "bulk",
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="Job parameter KEY=VALUE (repeatable), e.g. summary_words=40."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Add a schedule; prints its id and next run."""
    params: dict[str, Any] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--param {item!r}: expected KEY=VALUE")
        params[key.strip()] = _value(value)
    body = {
        "collection": collection,
        "cron": cron,
        "timezone": timezone,
        "task": task,
        "model": model,
        "priority": priority,
        "params": params,
    }
    with api_client() as client:
        s = client.create_schedule(body)
    if as_json:
        print_json(s)
        return
    out.print(
        f"schedule [bold]{s['id']}[/]: {s['cron']} ({s['timezone']}), next run {s['next_run_at']}"
    )


def _value(raw: str) -> Any:
    """Numbers and JSON lists as such (max_tokens=32, labels=["a","b"]); anything else text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@schedules_app.command("list")
def schedules_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Your schedules, their next run and what their last run did."""
    with api_client() as client:
        page = client.schedules()
    if as_json:
        print_json(page)
        return
    table = Table("collection", "cron", "timezone", "task", "next run (UTC)", "last run")
    table.add_column("id", no_wrap=True)
    for s in page["data"]:
        table.add_row(
            s["collection"],
            s["cron"],
            s["timezone"],
            s["task"],
            s["next_run_at"][:16],
            s["last_run_outcome"] or "-",
            s["id"],
        )
    out.print(table)


@schedules_app.command("remove")
def schedules_remove(schedule_id: Annotated[str, typer.Argument(help="Schedule id.")]) -> None:
    """Delete a schedule (jobs it already created carry on)."""
    with api_client() as client:
        client.delete_schedule(schedule_id)
    out.print(f"schedule {schedule_id} deleted")


@schedules_app.command("run-now")
def schedules_run_now(
    schedule_id: Annotated[str, typer.Argument(help="Schedule id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Run a schedule now. Twice in the same minute gives the same job."""
    with api_client() as client:
        run = client.run_schedule(schedule_id)
    if as_json:
        print_json(run)
        return
    job = run["job"]
    if run["outcome"] == "empty":
        out.print("no new or changed documents: no job created")
    elif run["outcome"] == "created":
        out.print(f"job {job['id']} queued: {job['counts']['total']} documents")
    elif run["outcome"] == "busy":
        out.print(f"an earlier run's job {job['id']} is still {job['status']}: no new job")
    else:
        out.print(f"job {job['id']} ({job['status']}) already covers this minute's run")
