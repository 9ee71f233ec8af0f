"""The vocabulary of jobs: tasks, job statuses and chunk states, as ``StrEnum``s.

A ``StrEnum`` member is its string, so it goes into SQL parameters, JSON and CHECK constraints
as is, while code that compares or branches on a status gets a typo caught by mypy.
"""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    """What a job does with each document. ``chat`` and ``completion`` are an OpenAI batch's
    rows: each document carries its own request (``documents.extra["body"]``)."""

    GENERATE = "generate"
    SUMMARIZE = "summarize"
    CLASSIFY = "classify"
    CHAT = "chat"
    COMPLETION = "completion"

    @property
    def openai(self) -> bool:
        return self in (Task.CHAT, Task.COMPLETION)


#: What a native job (an upload, a schedule) may ask, in the order messages list them; the
#: others come from batch files.
NATIVE_TASKS = (Task.GENERATE, Task.SUMMARIZE, Task.CLASSIFY)


class JobStatus(StrEnum):
    """``validating → queued → running → completed | failed``, or ``cancelling → cancelled``."""

    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def open(self) -> bool:
        """Chunks of a job in this status may still be claimed."""
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
CANCEL_STATUSES = frozenset({JobStatus.CANCELLING, JobStatus.CANCELLED})


class ChunkState(StrEnum):
    """``queued → leased → done | failed | cancelled``; a lease that expires goes back to
    ``queued`` (or ``failed`` once the chunk used up its attempts)."""

    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({ChunkState.DONE, ChunkState.FAILED, ChunkState.CANCELLED})


def sql_in(column: str, values: type[StrEnum] | frozenset[StrEnum] | tuple[StrEnum, ...]) -> str:
    """``column IN ('a', 'b')`` for a CHECK constraint or a fixed filter."""
    items = sorted(values) if isinstance(values, frozenset) else list(values)
    return f"{column} IN ({', '.join(repr(str(v)) for v in items)})"
