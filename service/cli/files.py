"""``docqueue files ...``: the Files API (``/v1/files``) from the command line: a batch's
input uploaded, listed, shown, downloaded and removed. HTTP client commands like ``submit``:
an error prints the API's message, never a traceback."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from service.cli.output import api_client, err, out, print_json

app = typer.Typer(
    help="Files (OpenAI's Files API): batch inputs and outputs.", no_args_is_help=True
)


def _when(epoch: int | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(files: list[dict[str, Any]]) -> Table:
    table = Table("id", "filename", "bytes", "purpose", "created (UTC)", "expires (UTC)")
    for f in files:
        table.add_row(
            f["id"],
            f["filename"],
            f"{f['bytes']:,}",
            f["purpose"],
            _when(f["created_at"]),
            _when(f.get("expires_at")),
        )
    table.columns[2].justify = "right"
    return table


@app.command("upload")
def upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    expires_after_s: Annotated[
        int | None,
        typer.Option(help="Seconds the file lives (3600-2592000; default: the server's)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the FileObject as JSON.")] = False,
) -> None:
    """Upload FILE (a batch's JSONL input, purpose batch); prints its id."""
    with api_client() as client:
        made = client.upload_file(file, expires_after_s)
    if as_json:
        print_json(made)
        return
    out.print(made["id"])
    err.print(f"{made['bytes']:,} bytes, expires {_when(made.get('expires_at'))} UTC")


@app.command("list")
def list_files(
    purpose: Annotated[str | None, typer.Option(help="batch | batch_output")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Your files, newest first."""
    with api_client() as client:
        page = client.files(purpose=purpose, limit=limit)
    if as_json:
        print_json(page)
        return
    out.print(_table(page["data"]))


@app.command("get")
def get(
    file_id: Annotated[str, typer.Argument(help="File id (file-...).")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Download its content to this file ('-': stdout)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the FileObject as JSON.")] = False,
) -> None:
    """Show a file, or with -o download its content."""
    with api_client() as client:
        if output is None:
            made = client.file(file_id)
            if as_json:
                print_json(made)
            else:
                out.print(_table([made]))
            return
        if str(output) == "-":
            for piece in client.file_content(file_id):
                sys.stdout.buffer.write(piece)
            sys.stdout.buffer.flush()
            return
        part = output.with_name(output.name + ".part")  # never a partial file under OUTPUT
        written = 0
        try:
            with part.open("wb") as f:
                for piece in client.file_content(file_id):
                    written += f.write(piece)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        part.replace(output)
    err.print(f"wrote {written:,} bytes to {output}")


@app.command("rm")
def rm(file_id: Annotated[str, typer.Argument(help="File id (file-...).")]) -> None:
    """Delete a file and its content."""
    with api_client() as client:
        gone = client.delete_file(file_id)
    out.print(f"deleted {gone['id']}")
