"""Usage reports from the ``usage_daily`` ledger: documents, tokens and upload bytes per UTC
day, model and tenant.

The ledger is written with the results themselves (``service.store.chunks._insert_results``)
and at submit (upload bytes), never from ``results``: a job deleted or purged by retention
keeps its usage, and a report reads a few rows per job and day, not every result.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal

from sqlalchemy import text
from sqlalchemy.orm import Session

Group = Literal["day", "model", "tenant"]

#: Each group's column in the query (fixed strings: nothing of a request reaches the SQL).
_GROUP_SQL = {"day": "u.day", "model": "u.model", "tenant": "t.name"}


@dataclass(frozen=True)
class UsageRow:
    day: date | None
    model: str | None
    tenant: str | None
    documents: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    upload_bytes: int


def report(
    session: Session,
    tenant_id: uuid.UUID | None,
    start: date,
    end: date,
    group_by: Sequence[Group],
) -> list[UsageRow]:
    """Sums over ``start``..``end`` (UTC days, both included) per group, in group order;
    ``tenant_id`` None: every tenant."""
    cols = [_GROUP_SQL[g] for g in group_by]
    select_cols = ", ".join(
        f"{_GROUP_SQL[g]} AS {g}" if g in group_by else f"NULL AS {g}" for g in _GROUP_SQL
    )
    group = f"GROUP BY {', '.join(cols)} ORDER BY {', '.join(cols)}" if cols else ""
    where = "u.day BETWEEN :start AND :end"
    if tenant_id is not None:
        where += " AND u.tenant_id = :t"
    rows = session.execute(
        text(
            f"""
            SELECT {select_cols},
                   coalesce(sum(u.documents), 0), coalesce(sum(u.failed), 0),
                   coalesce(sum(u.prompt_tokens), 0), coalesce(sum(u.completion_tokens), 0),
                   coalesce(sum(u.upload_bytes), 0)
            FROM usage_daily u JOIN tenants t ON t.id = u.tenant_id
            WHERE {where}
            {group}
            """
        ),
        {"start": start, "end": end, "t": tenant_id},
    ).all()
    return [
        UsageRow(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), int(r[6]), int(r[7]))
        for r in rows
    ]
