"""The ``docqueue`` command line: the root app and its command groups.

Each group lives in its own module: ``servers`` (the processes: api, worker, flower, beat,
db upgrade), ``keys``, ``jobs`` (the HTTP client commands for jobs), ``collections``
(collections and schedules), ``files`` (the Files API) and ``usage`` (usage, and the admin
commands: quotas, tenants, workers, queues). ``app`` is the console script's entry point
(``service.cli:app``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from service import __version__
from service.cli import collections, files, jobs, keys, run, servers, usage
from service.cli.output import fail, out

app = typer.Typer(
    name="docqueue",
    help="Bulk LLM work over documents (generate, summarize, classify) as asynchronous jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Unnamed groups add their commands to the root; `docqueue --help` lists them in this order.
app.add_typer(run.app)
app.add_typer(servers.app)
app.add_typer(jobs.app)
app.add_typer(servers.db_app, name="db")
app.add_typer(keys.app, name="keys")
app.add_typer(collections.collections_app, name="collections")
app.add_typer(collections.schedules_app, name="schedules")
app.add_typer(files.app, name="files")
app.add_typer(usage.app)
app.add_typer(usage.quotas_app, name="quotas")


def _version(value: bool) -> None:
    if value:
        out.print(f"docqueue {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """docqueue: submit CSVs of documents, follow the jobs, download the results."""
    from service import logs

    try:
        logs.configure()  # one format for every command (DOCQUEUE_LOG_FORMAT, DOCQUEUE_LOG_LEVEL)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        fail(f"invalid settings: {exc}")
