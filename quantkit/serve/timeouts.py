"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request head (slowloris).

uvicorn closes a keep-alive connection that stays idle ``timeout_keep_alive`` seconds after a
response, but has no timer while a request head arrives, and any byte cancels the keep-alive
timer: a client that sends one byte every few seconds holds its connection for good, and with
``limit_concurrency`` such connections would crowd out real clients (each counts against the
limit).  `with_head_timeout` adds one timer to uvicorn's h11 protocol: armed when a connection
opens and after each response, stopped when a whole request head has arrived; when it fires the
connection is closed, as nginx's ``client_header_timeout`` does.  The body of a request is not
timed (a reverse proxy's ``client_body_timeout`` covers that, see the README); a head is at most
uvicorn's h11 limit of 16 KiB.

    >>> uvicorn.run(app, http=with_head_timeout(10.0), timeout_keep_alive=5)   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutProtocol(H11Protocol):
    """`H11Protocol` closing a connection whose request head is not complete ``head_timeout``
    seconds after the connection opened or the previous response ended."""

    head_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # h11 parsed a whole request head
            self._stop_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next (pipelined) request at once
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection whose request head took over %gs", self.head_timeout)
            self.transport.close()


def with_head_timeout(seconds: float) -> type[HeadTimeoutProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with a ``seconds`` deadline per request head."""
    if not seconds > 0:
        raise ValueError(f"the request head timeout must be > 0, got {seconds}")
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout": float(seconds)})
