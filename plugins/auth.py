"""auth: SMTP AUTH PLAIN, LOGIN and CRAM-MD5 against the directory, with TLS gating.

The core runs the AUTH command (sequence checks, the ``334`` exchange, ``*`` to cancel, base64,
``235``/``535``); this plugin offers the mechanisms and checks the credentials. A mechanism
switched off "for non-SSL" is not advertised on a plaintext session and answers ``538 5.7.11``
there; after STARTTLS and on implicit TLS every mechanism is offered. CRAM-MD5 needs plaintext
passwords, so it is offered only when some user has one.

Every PLAIN/LOGIN attempt costs one slow hash verification, known user or not
(:meth:`ingress.directory.Directory.verify_password`); it runs in a worker thread so that other
sessions are not held up while argon2/bcrypt works.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time

import ingress_schemas
from ingress import Reply, hookimpl
from ingress.auth import AuthSyntaxError, Mechanism

SWITCHES = {
    "PLAIN": "disable_plain_without_tls",
    "LOGIN": "disable_login_without_tls",
    "CRAM-MD5": "disable_cram_md5_without_tls",
}
ENCRYPTION_REQUIRED = Reply(538, "5.7.11",
                            "Encryption required for requested authentication mechanism")
_HEX_DIGEST = re.compile(r"[0-9a-f]{32}\Z")


@hookimpl
def config_schema():
    return ingress_schemas.load("auth")


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthSyntaxError() from None


async def check_password(session, address: str, password: str) -> str | None:
    """The user's configured address when *password* is right, else None (one hash check)."""
    directory = session.directory
    if not await asyncio.to_thread(directory.verify_password, address, password):
        return None
    user = directory.user(address)
    return user.address if user is not None else None


class Plain(Mechanism):
    """RFC 4616: ``authzid NUL authcid NUL password``; authzid empty or equal to authcid."""

    name = "PLAIN"

    async def authenticate(self, session, exchange, initial):
        data = initial if initial is not None else await exchange.challenge(b"")
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise AuthSyntaxError()
        authzid, authcid, password = map(_text, parts)
        user = await check_password(session, authcid, password)
        if user is None or (authzid and authzid.lower() != user.lower()):
            return None  # acting as someone else is not supported
        return user


class Login(Mechanism):
    """The LOGIN mechanism: ``Username:`` then ``Password:`` (the user may come initially)."""

    name = "LOGIN"

    async def authenticate(self, session, exchange, initial):
        username = initial if initial is not None else await exchange.challenge(b"Username:")
        password = await exchange.challenge(b"Password:")
        return await check_password(session, _text(username), _text(password))


def new_challenge(hostname: str) -> bytes:
    """A fresh RFC 2195 challenge: ``<random.timestamp@hostname>``."""
    return f"<{secrets.randbits(63)}.{int(time.time())}@{hostname}>".encode()


def cram_md5_digest(secret: str, challenge: bytes) -> str:
    """RFC 2195: the hex HMAC-MD5 of the challenge keyed with the shared secret."""
    return hmac.new(secret.encode("utf-8"), challenge, hashlib.md5).hexdigest()


class CramMD5(Mechanism):
    """RFC 2195. The response is ``<user> <hex digest>``; a user without a plaintext password
    (hash only) cannot use it and fails like a wrong password."""

    name = "CRAM-MD5"

    async def authenticate(self, session, exchange, initial):
        if initial is not None:
            raise AuthSyntaxError()  # the server speaks first (RFC 4954 4: 501)
        challenge = new_challenge(session.hostname)
        username, sp, digest = _text(await exchange.challenge(challenge)).rpartition(" ")
        digest = digest.lower()
        if not sp or not username or not _HEX_DIGEST.match(digest):
            raise AuthSyntaxError()
        directory = session.directory
        secret = directory.cram_md5_secret(username)
        # Unknown and hash-only users cost the same HMAC as everyone else.
        expected = cram_md5_digest(secret if secret is not None else secrets.token_hex(16),
                                   challenge)
        if hmac.compare_digest(expected, digest) and secret is not None:
            return directory.user(username).address
        return None


def _gated(session, settings, name: str) -> bool:
    return not session.tls and settings[SWITCHES[name]]


@hookimpl
def auth_mechanisms(session, settings):
    offered = [Plain, Login]
    if session.directory.has_plaintext_passwords:
        offered.append(CramMD5)
    return [cls(advertised=not _gated(session, settings, cls.name)) for cls in offered]


@hookimpl
def on_auth(session, mechanism, settings):
    if mechanism in SWITCHES and _gated(session, settings, mechanism):
        return ENCRYPTION_REQUIRED
    return None
