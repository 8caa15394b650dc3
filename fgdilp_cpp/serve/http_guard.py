"""Transport-level guards of `serve` that the app cannot see: a deadline for a request's headers
(uvicorn has none: a client that connects and sends nothing, or dribbles its headers, would hold
one of the --max-connections slots forever) and the loopback Host check (DNS rebinding)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Optional

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not complete
    within `seconds` of its opening or of the previous response (the body has its own deadline
    in openai_api.read_json)."""

    class HeaderDeadline(H11Protocol):
        _deadline: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()                        # the next request on a kept-alive connection

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()                 # the headers are in: the app runs, with its own limits

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return HeaderDeadline


def loopback_host_header(host: str) -> bool:
    """localhost, a loopback IPv4 address or [::1], each with an optional :port."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port: Optional[str] = rest[1:] if rest.startswith(":") else (None if rest else "")
    else:
        name, _, port = host.partition(":")
    if port is None or (port and not port.isdigit()):
        return False
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
