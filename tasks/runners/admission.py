"""What a request to the demo server may cost, decided before the work starts (the request-admission layer).

`Admission` is an ASGI middleware in front of the app's costly routes (`/api/predict`):

- a byte budget: the body is counted while it streams in, chunked uploads without a Content-Length included; past
  `max_body_bytes` the client gets 413 at once and the app reads nothing more (nothing is spooled to disk);
- a bounded pool: at most `max_active` such requests are read, decoded and run at a time; one more gets 503 at
  once instead of waiting in a queue whose uploads would pile up in memory;
- slow clients: a body whose next chunk does not arrive within `body_timeout` seconds ends with 408.

The pixel budget (`max_pixels`: the largest image decoded, refused from its header before any decoding) is the
server's `Demo(max_pixels=...)`. `serve(app, host, port, limits)` runs uvicorn with the middleware, keep-alive and
shutdown timeouts, so SIGTERM stops the server within `shutdown_seconds` even with requests in flight. Memory per
request is then bounded by the body and pixel budgets, and the whole server's by `max_active` times that
(tests/runners/test_admission.py holds it to a stated bound under concurrent hostile uploads).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import uvicorn  # the serve extra: this module is imported only once `vilbert serve` found it

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class AdmissionLimits:
    """The budgets of one demo server (defaults sized for a laptop)."""

    max_body_bytes: int = 10 * 1024 * 1024 + 64 * 1024  # the upload limit plus the form's own fields
    max_pixels: int = 12_000_000  # the largest image decoded (a 4000 x 3000 photo)
    max_active: int = 2  # costly requests served at once
    body_timeout: float = 20.0  # seconds between two chunks of a body
    shutdown_seconds: float = 3.0  # SIGTERM: requests in flight get this long, then the server stops

    @classmethod
    def for_uploads(cls, max_upload_bytes: int, **changes: Any) -> AdmissionLimits:
        return cls(max_body_bytes=max_upload_bytes + 64 * 1024, **changes)


class Admission:
    """The ASGI middleware (see the module docstring); `guarded` are the paths it budgets."""

    def __init__(self, app: ASGIApp, limits: AdmissionLimits, guarded: tuple[str, ...] = ("/api/predict",)):
        self.app, self.limits, self.guarded = app, limits, guarded
        self.active = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.guarded:
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _reply(send, 413, f"the request is {length.decode(errors='replace')} bytes; at most {limit}")
            return
        if self.active >= self.limits.max_active:
            await _reply(send, 503, f"the server is busy with {self.active} request(s); try again in a moment")
            return
        self.active += 1
        state = {"received": 0, "replied": False}

        async def bounded_receive() -> Message:
            if state["replied"]:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_timeout)
            except asyncio.TimeoutError:
                await refuse(408, f"the upload stalled for {self.limits.body_timeout:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    await refuse(413, f"the request is larger than {limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def refuse(status: int, text: str) -> None:
            state["replied"] = True
            await _reply(send, status, text)

        async def app_send(message: Message) -> None:
            if not state["replied"]:  # after a refusal the app's own answer is dropped
                await send(message)

        try:
            await self.app(scope, bounded_receive, app_send)
        except Exception:
            if not state["replied"]:
                raise  # the app's own failure
        finally:
            self.active -= 1


async def _reply(send: Send, status: int, text: str) -> None:
    body = json.dumps({"error": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def serve(app: ASGIApp, host: str, port: int, limits: AdmissionLimits) -> None:
    """Run `app` behind `Admission` with uvicorn until SIGINT or SIGTERM (stopping within `shutdown_seconds`)."""
    uvicorn.run(Admission(app, limits), host=host, port=port, log_level="warning", timeout_keep_alive=5,
                timeout_graceful_shutdown=limits.shutdown_seconds)
