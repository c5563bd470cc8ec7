"""The uvicorn server `choicelm serve` runs: h11 with limits and timeouts, so half-sent connections do not stay
open forever.

uvicorn times out only idle keep-alive connections, and only after a first response: a client that connects and
sends nothing, or half a request head, holds its connection (a file descriptor, a slot) forever. GuardedH11Protocol
closes a connection whose request head is not complete `header_timeout` seconds after it opened (or after the
previous response ended). A head that came whole but a body that does not is the app's to time out
(security.read_body: 408).
"""

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # from connection (or the last response) to a complete request head
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; more gets h11's 400


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head does not arrive in time."""

    header_timeout = HEADER_TIMEOUT_S
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete  # else a request is being served
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def protocol(header_timeout: float = HEADER_TIMEOUT_S) -> type:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})


def uvicorn_settings(header_timeout: float = HEADER_TIMEOUT_S, keep_alive: int = KEEP_ALIVE_S) -> dict:
    """Keyword arguments for uvicorn.run / uvicorn.Config."""
    return dict(http=protocol(header_timeout), timeout_keep_alive=keep_alive,
                h11_max_incomplete_event_size=MAX_HEAD_BYTES, log_level="warning")


def uvicorn_config(app, host: str, port: int, **settings):
    """The uvicorn.Config `choicelm serve` runs with (tests start servers with it too)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, **uvicorn_settings(**settings))
