"""SASL mechanisms for AUTH. Plugin authors may import :class:`Mechanism` and
:class:`AuthExchange`.

The core owns the AUTH command: sequence checks, the ``334`` challenge/response exchange over the
wire (base64, ``*`` to cancel, the command timeout), and the final ``235``/``535`` reply. A
mechanism only computes: it receives the initial response and asks for more with
:meth:`AuthExchange.challenge`. Plugins offer mechanisms through the ``auth_mechanisms`` hook.
"""

from __future__ import annotations

from typing import Protocol


class AuthCancelled(Exception):
    """The client answered a challenge with ``*``."""


class AuthSyntaxError(Exception):
    """The client's response was not valid base64 (or not what the mechanism expects)."""


class AuthExchange(Protocol):
    async def challenge(self, data: bytes) -> bytes:
        """Send ``334 <base64(data)>`` and return the client's decoded answer."""

    @property
    def closed(self) -> bool:
        """True once the connection is closed (the client reset it, or the session was cut):
        nobody will read the answer, so a mechanism may skip expensive work."""


class Mechanism:
    """One SASL mechanism. Subclass and implement :meth:`authenticate`.

    :param name: upper-case mechanism name (``"PLAIN"``).
    :param advertised: offered in EHLO on this session; a mechanism that is known but not
        advertised is refused by whichever ``on_auth`` implementation disabled it.
    """

    name = ""

    def __init__(self, advertised: bool = True):
        self.advertised = advertised

    async def authenticate(self, session, exchange: AuthExchange,
                           initial: bytes | None) -> str | None:
        """Run the exchange; return the authenticated address, or ``None`` for bad credentials.
        Raise :class:`AuthSyntaxError` for a malformed response."""
        raise NotImplementedError
