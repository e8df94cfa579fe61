"""A third-party test plugin: AUTH PLAIN against the directory, with no TLS gating.

It exists so core tests can authenticate before the builtin auth plugin is there, and it shows
that a plugin loaded by dotted path uses the same hooks as builtins."""

from ingress import hookimpl
from ingress.auth import AuthSyntaxError, Mechanism

NAME = "fake_auth"


class Plain(Mechanism):
    name = "XPLAIN"

    async def authenticate(self, session, exchange, initial):
        data = initial if initial is not None else await exchange.challenge(b"")
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise AuthSyntaxError()
        user, password = parts[1].decode(), parts[2].decode()
        return user if session.directory.verify_password(user, password) else None


@hookimpl
def auth_mechanisms(session):
    return [Plain()]
