"""A header deadline for uvicorn's HTTP/1.1 protocol: the slow-loris defence uvicorn lacks.

uvicorn counts every open connection against `limit_concurrency` (our `max_connections`), but it
never times out a request's headers: a client that connects and sends nothing, or trickles a header
line every few seconds, holds its place for as long as it likes (the keep-alive timer runs only
between requests, and any byte cancels it). `max_connections` such clients refuse everybody else.

`header_deadline_protocol(seconds)` is uvicorn's own h11 protocol plus one timer: a request's headers
must be complete `seconds` after the connection opens, or after the first byte of a later request on a
kept-alive connection. A late one gets `408 Request Timeout` and the connection is closed. An idle
kept-alive connection is left to uvicorn's keep-alive timer, and a body that trickles in is the
application's `body_timeout_s` (app.py). Passed to uvicorn as `Config(http=...)`, which takes a
protocol class; uvicorn (and its h11 dependency) is imported only when a server is built.
"""

from __future__ import annotations

from ..validation import check_positive

__all__ = ["header_deadline_protocol", "REQUEST_TIMEOUT"]

_LATE = b"the request's headers did not arrive in time (header_timeout_s)"
# Written to the socket directly: h11 refuses to send a response before a request has arrived.
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_LATE), _LATE))


def header_deadline_protocol(seconds: float) -> type:
    """A subclass of uvicorn's `H11Protocol` that closes connections whose request headers are not
    complete `seconds` after they started (408 first). Raises ValueError for a non-positive time."""
    seconds = check_positive("header_timeout_s", seconds, unit="seconds")
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        """uvicorn's h11 protocol with a deadline on each request's headers (see the module)."""

        header_timeout_s = seconds

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = None
            self._deadline_cycle = None
            self._arm()  # a client that connects and sends nothing is timed from here

        def data_received(self, data: bytes) -> None:
            # A kept-alive connection's next request starts its clock at its first byte; `cycle` is the
            # request/response cycle the deadline belongs to, so one armed for an earlier request
            # (already answered) does not count for this one.
            if self.conn.their_state is h11.IDLE and self._deadline_cycle is not self.cycle:
                self._arm()
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline_cycle = self.cycle
            self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self) -> None:
            self._deadline = None
            # h11 leaves IDLE once a request's headers have been parsed; a new cycle means they were.
            # (`_arm` cancels the previous timer, so `_deadline_cycle` is the one this timer was armed for.)
            if (self.transport.is_closing() or self.cycle is not self._deadline_cycle
                    or self.conn.their_state is not h11.IDLE):
                return
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()

    return HeaderDeadlineH11
