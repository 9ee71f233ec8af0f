"""Request validation: a job submission checked once, however it arrived (form, CLI, schedule)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from service.errors import InvalidParameterError
from service.jobs import templates
from service.jobs.formats import parse_format
from service.jobs.ingest import parse_delimiter
from service.settings import Settings
from service.store.states import NATIVE_TASKS

#: Every task a causal language model serves (the native three and an OpenAI batch's rows).
CAUSAL_TASKS = (*NATIVE_TASKS, "chat", "completion")


@dataclass(frozen=True)
class ModelCapabilities:
    """What a served model can do, as its workers' engine says (``/v1/models`` shows it, and
    jobs are checked against it): its tasks, a classifier's fixed labels (``id2label``), and
    whether its input is a prompt (False: an encoder classifier takes the document itself)."""

    tasks: tuple[str, ...] = CAUSAL_TASKS
    labels: tuple[str, ...] | None = None
    prompted: bool = True

    @classmethod
    def of(cls, raw: dict[str, Any] | None) -> ModelCapabilities | None:
        """From a worker row's JSON (None: a worker that does not say, vLLM's)."""
        if not raw:
            return None
        labels = raw.get("labels")
        return cls(
            tasks=tuple(raw.get("tasks") or CAUSAL_TASKS),
            labels=tuple(labels) if labels else None,
            prompted=bool(raw.get("prompted", True)),
        )

    def as_json(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "labels": self.labels and list(self.labels),
                "prompted": self.prompted}  # fmt: skip


def check_capabilities(req: JobRequest, caps: ModelCapabilities | None) -> None:
    """A job the model cannot run is a 422 naming why: a task it does not serve, or labels
    other than a classifier's own. A classifier's job without labels gets its labels."""
    if caps is None:
        return
    if req.task not in caps.tasks:
        kind = f"a classifier (labels {list(caps.labels)})" if caps.labels else "this model"
        raise InvalidParameterError(
            f"model {req.model!r} is {kind}: it serves {', '.join(caps.tasks)}, not {req.task}",
            field="task",
        )
    if req.task == "classify" and caps.labels is not None:
        if req.labels is None:
            req.labels = list(caps.labels)
        elif sorted(req.labels) != sorted(caps.labels):
            raise InvalidParameterError(
                f"labels must be the classifier's own, {list(caps.labels)}, or left out; "
                f"got {req.labels}",
                field="labels",
            )


@dataclass
class JobRequest:
    """A validated job submission, independent of how it arrived (HTTP form, CLI, schedule)."""

    task: str
    model: str
    text_column: str = "text"
    id_column: str | None = None
    prompt: str | None = None
    labels: list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    chunk_size: int | None = None
    priority: int = 0
    delimiter: str | None = None
    format: str | None = None  # csv, jsonl, parquet; None: from the file name or content
    idempotency_key: str | None = None
    source_name: str | None = None
    extra_params: dict[str, Any] = field(default_factory=dict)
    # What the model's live workers say it can do (None: unknown or unserved); not stored.
    capabilities: ModelCapabilities | None = None


def parse_labels(raw: str | None) -> list[str] | None:
    """Labels as a JSON list or comma-separated text; blanks dropped, order kept, duplicates out."""
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    if raw.startswith("["):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidParameterError(
                f"labels: invalid JSON list ({exc.msg})", field="labels"
            ) from exc
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidParameterError(
                "labels: a JSON list of strings is expected", field="labels"
            )
        items = value
    else:
        items = raw.split(",")
    labels = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    return labels or None


def template_fields(prompt: str) -> frozenset[str]:
    """Field names a prompt template uses; a malformed template is a 422 naming ``prompt``
    (the rules: ``service.jobs.templates``)."""
    return templates.parse(prompt).fields


#: Idempotency keys of scheduled runs (service.collections.schedules); clients may not use it.
RESERVED_KEY_PREFIX = "schedule:"


def validate(req: JobRequest, settings: Settings) -> None:
    if req.task not in NATIVE_TASKS:
        raise InvalidParameterError(
            f"unknown task {req.task!r}; expected one of: {', '.join(NATIVE_TASKS)}", field="task"
        )
    if not req.model.strip():
        raise InvalidParameterError("model must not be empty", field="model")
    check_capabilities(req, req.capabilities)
    if req.task == "classify" and not req.labels:
        raise InvalidParameterError(
            "classify needs labels: comma-separated (a,b,c) or a JSON list", field="labels"
        )
    if req.task == "classify" and req.labels is not None and len(req.labels) < 2:
        raise InvalidParameterError("classify needs at least two labels", field="labels")
    if req.prompt is not None:
        if not isinstance(req.prompt, str):
            raise InvalidParameterError("prompt must be a string", field="prompt")
        template = templates.check(req.prompt, settings.jobs.max_template_chars)
        if req.task != "generate" and "text" not in template.fields:
            raise InvalidParameterError(
                f"prompt for {req.task} must contain {{text}}", field="prompt"
            )
    words = req.extra_params.get("summary_words")
    if words is not None and not 1 <= int(words) <= 10_000:
        raise InvalidParameterError(
            "summary_words must be between 1 and 10000", field="summary_words"
        )
    if req.max_tokens is not None and not 1 <= req.max_tokens <= 1_000_000:
        raise InvalidParameterError("max_tokens must be between 1 and 1000000", field="max_tokens")
    if req.temperature is not None and not 0.0 <= req.temperature <= 10.0:
        raise InvalidParameterError("temperature must be between 0 and 10", field="temperature")
    size = req.chunk_size
    low, high = settings.jobs.min_chunk_size, settings.jobs.max_chunk_size
    if size is not None and not low <= size <= high:
        raise InvalidParameterError(
            f"chunk_size must be between {low} and {high} (DOCQUEUE_MIN_CHUNK_SIZE, "
            "DOCQUEUE_MAX_CHUNK_SIZE)",
            field="chunk_size",
        )
    parse_delimiter(req.delimiter)
    req.format = parse_format(req.format)


def job_params(req: JobRequest) -> dict[str, Any]:
    params: dict[str, Any] = {
        "text_column": req.text_column,
        "id_column": req.id_column,
        "prompt": req.prompt,
        "labels": req.labels,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        **req.extra_params,
    }
    return {k: v for k, v in params.items() if v is not None}


def auto_chunk_size(rows: int, settings: Settings) -> int:
    """The chunk size of a job that names none: ``default_chunk_size`` rows, or more for a
    job that would otherwise have over ``chunks_per_job`` chunks (at most ``max_chunk_size``).
    A thousand chunks still spread a job across many workers and give other tenants' jobs
    turns between them, while their per-chunk costs stay small next to the rows'."""
    jobs = settings.jobs
    return min(max(jobs.default_chunk_size, -(-rows // jobs.chunks_per_job)), jobs.max_chunk_size)
