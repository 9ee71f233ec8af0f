"""Bounds on result downloads, so slow or stalled readers cannot take the API down.

- At most ``settings.api.max_concurrent_exports`` downloads run at once per API process; one
  more is refused at once with 503 and ``Retry-After`` (``ExportsBusyError``) rather than
  queued, and every other route keeps its database connections.
- Every send of a download may wait at most ``settings.api.export_send_timeout_s`` for the
  client to take the bytes before it (a stalled or trickling reader); past that the transfer is
  cut off and its slot is given back. The connection is closed without the final chunk, so the
  client sees a broken download, never a short file that looks complete.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Annotated, ClassVar

import anyio
from fastapi import Depends, FastAPI, Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from service.errors import DocqueueError, TransientError

log = logging.getLogger(__name__)

#: What ``Retry-After`` tells a refused download, in seconds: about one large download's time.
RETRY_AFTER_S = 5


class ExportsBusyError(TransientError):
    """This API process already runs as many result downloads as it allows."""

    code = "exports_busy"
    headers: ClassVar[Mapping[str, str]] = {"Retry-After": str(RETRY_AFTER_S)}


class ExportSlots:
    """A per-process count of downloads in progress. ``acquire`` never waits: a download that
    finds none free is refused, so a flood of downloads cannot queue up behind each other."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_use = 0

    def acquire(self, limit: int) -> None:
        with self._lock:
            if self.in_use >= limit:
                raise ExportsBusyError(
                    f"{self.in_use} result downloads are in progress, the most this API process "
                    f"serves at once (DOCQUEUE_MAX_CONCURRENT_EXPORTS={limit}); retry in "
                    f"{RETRY_AFTER_S} s"
                )
            self.in_use += 1

    def release(self) -> None:
        with self._lock:
            self.in_use -= 1


_slots_lock = threading.Lock()


def slots_of(app: FastAPI) -> ExportSlots:
    """The app's slots, made on first use (one app per API process)."""
    with _slots_lock:
        slots: ExportSlots | None = getattr(app.state, "export_slots", None)
        if slots is None:
            slots = app.state.export_slots = ExportSlots()
        return slots


def get_slots(request: Request) -> ExportSlots:
    return slots_of(request.app)


Slots = Annotated[ExportSlots, Depends(get_slots)]


class ExportResponse(StreamingResponse):
    """A streamed download that holds one of ``slots`` (already acquired) until it ends, however
    it ends, and gives up on a send the client has not taken within ``send_timeout_s``."""

    def __init__(
        self,
        content: Iterable[bytes],
        *,
        slots: ExportSlots,
        send_timeout_s: float,
        what: str,
        media_type: str,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self.slots = slots
        self.send_timeout_s = send_timeout_s
        self.what = what

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def timed_send(message: Message) -> None:
            with anyio.fail_after(self.send_timeout_s):
                await send(message)

        try:
            await super().__call__(scope, receive, timed_send)
        except TimeoutError:
            # Returning without the last message makes the server close the connection.
            log.warning(
                "download of %s cut off: the client took nothing for %g s",
                self.what,
                self.send_timeout_s,
            )
        except DocqueueError as exc:  # raised while streaming: too late for an error response
            log.warning("download of %s aborted: %s", self.what, exc.message)
        finally:
            self.slots.release()
