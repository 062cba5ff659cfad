"""The server's HTTP plumbing: one socket write per response, and JSON through orjson.

uvicorn's httptools protocol writes a response's status line and headers, then its body, as two
``transport.write`` calls: two ``send`` syscalls and two TCP segments per response. On loopback
each one also runs the receiver's side of the TCP stack, and profiles of the server under load
put a third of the event loop thread's time in them. ``CoalescingHttpToolsProtocol`` (given to
uvicorn as its ``http`` protocol class) joins the writes of one event-loop step into one: writes
are buffered and flushed by a callback scheduled for the end of the step (a response's ``send``
calls do not suspend in between), and before the connection closes.

``JSON`` is Starlette's ``Response`` rendered by orjson (several times faster than the standard
library on the float lists of a recommendation; non-finite floats become null).
"""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
import uvicorn
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport proxy whose writes within one event-loop step go out as one write."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop, self._pending = transport, loop, []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each response with one syscall (see the module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def parse_json(raw: bytes) -> Any:
    """The parsed body; raises ValueError (orjson.JSONDecodeError) on malformed JSON or bad UTF-8."""
    return orjson.loads(raw)


def uvicorn_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` with the coalescing protocol (the command and the tests use it)."""
    return uvicorn.Config(app, http=CoalescingHttpToolsProtocol, **kwargs)
