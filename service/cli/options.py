"""The options several commands share (``submit`` and ``run`` take a job's; ``run`` and
``worker`` an engine), declared once so their names, types and help stay the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

InputFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)]
Task = Annotated[
    str | None,
    typer.Option(help="generate | summarize | classify (not for an OpenAI batch file)"),
]
TextColumn = Annotated[str, typer.Option(help="Column holding the document text.")]
IdColumn = Annotated[str | None, typer.Option(help="Column with unique ids.")]
Prompt = Annotated[str | None, typer.Option(help="Template with {text} and columns.")]
Labels = Annotated[str | None, typer.Option(help="classify: a,b,c or a JSON list.")]
MaxTokens = Annotated[int | None, typer.Option()]
Temperature = Annotated[float | None, typer.Option()]
Seed = Annotated[int | None, typer.Option()]
ChunkSize = Annotated[int | None, typer.Option(help="Documents per chunk.")]
Delimiter = Annotated[str | None, typer.Option(help="',' ';' or 'tab' (default: sniffed).")]
Format = Annotated[
    str | None,
    typer.Option(
        "--format", help="csv | jsonl | parquet (default: from the file name, else content)."
    ),
]
SummaryWords = Annotated[int | None, typer.Option(help="summarize: summary length.")]
Language = Annotated[str | None, typer.Option(help="summarize: output language.")]
Engine = Annotated[
    str | None,
    typer.Option(help="vllm | transformers (default: DOCQUEUE_ENGINE, else vllm)."),
]
