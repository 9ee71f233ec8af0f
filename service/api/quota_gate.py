"""The quota check that runs before an upload's body is read.

FastAPI reads (and spools) a whole multipart body before any route dependency runs, so a
dependency would let a tenant already at its quota upload gigabytes only to be refused. This
route class runs ``service.store.quotas.check_before_upload`` first, with the tenant that
``Boundary`` authenticated; the exact check, rows and bytes included, is in the submit
transaction (``service.jobs.submit``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from service.api.deps import PRINCIPAL, read
from service.api.schemas import check_idempotency_key
from service.jobs.submit import find_idempotent
from service.settings import Settings
from service.store.keys import Principal
from service.store.quotas import check_before_upload

_F = TypeVar("_F", bound=Callable[..., Any])
_MARK = "__docqueue_quota_gated__"


def quota_gated(endpoint: _F) -> _F:
    """Marks a route (under ``@router.post``) that creates a job: a ``QuotaGatedRoute``
    checks the quotas before its body is read. Other routes of the router (cancel ...) are
    not gated: they never add to a quota, and cancelling frees one."""
    setattr(endpoint, _MARK, True)
    return endpoint


class QuotaGatedRoute(APIRoute):
    """An ``APIRoute`` that, for a ``quota_gated`` endpoint, first refuses a tenant already
    at a quota (429) before the request's body is read."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not getattr(self.endpoint, _MARK, False):
            return handler

        async def gated(request: Request) -> Response:
            who = getattr(request.state, PRINCIPAL, None)
            if isinstance(who, Principal):  # without Boundary the handler's own auth answers
                settings: Settings = request.app.state.settings
                # Checked here too: the replay lookup below must never see a hostile key (a
                # NUL is a database error); the same 422 the route would give, before the body.
                key = check_idempotency_key(request.headers.get("idempotency-key"))
                await run_in_threadpool(_check, request.app.state.db, who, key, settings)
            return await handler(request)

        return gated


def _check(db: Any, who: Principal, idempotency_key: str | None, settings: Settings) -> None:
    with read(db) as session:
        # A replay of a job already made is answered with that job whatever the quotas say
        # now: a client retrying after a lost response must get its job, not a 429.
        if idempotency_key and find_idempotent(session, who.tenant_id, idempotency_key):
            return
        check_before_upload(session, who.tenant_id, settings)
