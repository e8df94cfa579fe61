"""auth: SMTP AUTH PLAIN, LOGIN and CRAM-MD5 against the directory, with TLS gating.

The core runs the AUTH command (sequence checks, the ``334`` exchange, ``*`` to cancel, base64,
``235``/``535``); this plugin offers the mechanisms and checks the credentials. A mechanism
switched off "for non-SSL" is not advertised on a plaintext session and answers ``538 5.7.11``
there; after STARTTLS and on implicit TLS every mechanism is offered. CRAM-MD5 needs plaintext
passwords, so it is offered only when some user has one.

MAIL FROM's ``AUTH=`` parameter (RFC 4954 5: ``<>`` or an xtext mailbox, which relays such as
Dovecot's submission service send) is accepted when it is xtext, and never trusted: it is taken
as ``AUTH=<>`` (what the queue envelope then holds), and what the message counts as submitted
by is the session's own login, nothing a client asserts.

Every PLAIN/LOGIN attempt costs one slow hash verification, known user or not
(:meth:`ingress.directory.Directory.verify_password`). Checks run on a thread pool of their own
(:class:`CheckPool`), at most one per CPU at once: an AUTH flood queues behind it instead of
taking the threads and memory that mail delivery needs, and a waiting check holds no hash memory
(argon2 allocates its memory cost only while it runs). A failed attempt is answered no sooner
than ``failure_delay`` seconds after the AUTH command (or the last answer to a ``334``) was read,
whatever failed, so the time of a 535 tells nothing about the user and slows guessing down.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Counter, Gauge

import ingress_schemas
from ingress import Reply, hookimpl
from ingress.auth import AuthSyntaxError, Mechanism
from ingress.metrics import REGISTRY
from ingress.syntax import xtext_decode

log = logging.getLogger("ingress.auth")

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


RUNNING = Gauge("ingress_auth_checks_running", "Password checks running now",
                registry=REGISTRY, multiprocess_mode="livesum")
WAITING = Gauge("ingress_auth_checks_waiting", "Password checks waiting for a free CPU",
                registry=REGISTRY, multiprocess_mode="livesum")
RUNNING_MAX = Gauge("ingress_auth_checks_running_max",
                    "Most password checks that ran at once since the start (per worker)",
                    registry=REGISTRY, multiprocess_mode="livemax")

SKIPPED = Counter("ingress_auth_checks_skipped",
                  "Password checks not run because the client had gone before their turn",
                  registry=REGISTRY)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


CHECK_NICENESS = 10  # added to the check threads' nice value (Linux only)


def _lower_priority() -> None:
    """Make this thread (and the threads argon2 starts from it) yield the CPU to the event
    loop: when the CPUs are busy with hashes, SMTP sessions and deliveries still get their
    turn at once. Linux only, where a thread has a nice value of its own."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECK_NICENESS)
        except OSError:
            pass


class CheckPool:
    """Threads for password checks only, at most *size* running at once, at a lower CPU
    priority; further checks wait in the executor's queue as a function and its arguments. A
    check whose client has gone by the time a thread is free is skipped, so clients that reset
    at once cannot pile up work."""

    def __init__(self, size: int):
        self.size = size
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="ingress-auth",
                                            initializer=_lower_priority)
        self._lock = threading.Lock()
        self.running = self.waiting = self.running_max = 0

    def _count(self, running: int, waiting: int) -> None:
        with self._lock:
            self.running += running
            self.waiting += waiting
            self.running_max = max(self.running_max, self.running)
            RUNNING.set(self.running)
            WAITING.set(self.waiting)
            RUNNING_MAX.set(self.running_max)

    def _call(self, gone, fn, args):
        if gone():
            self._count(0, -1)
            SKIPPED.inc()
            return None
        self._count(1, -1)
        try:
            return fn(*args)
        finally:
            self._count(-1, 0)

    def _done(self, future) -> None:
        if future.cancelled():  # cancelled before it started: it never will
            self._count(0, -1)

    async def run(self, gone, fn, *args):
        """``fn(*args)`` on the pool, or None without calling it when ``gone()`` is true by the
        time its turn comes."""
        self._count(0, 1)
        future = self._executor.submit(self._call, gone, fn, args)
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)


_pool: tuple[int, CheckPool] | None = None
_pool_lock = threading.Lock()


def pool() -> CheckPool:
    """This process's pool, made at the first check (workers fork; threads do not survive)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), CheckPool(cpu_count()))
        return _pool[1]


async def check_password(session, exchange, address: str, password: str) -> str | None:
    """The user's configured address when *password* is right, else None (one hash check, on
    the pool; none when the client is gone before its turn)."""
    directory = session.directory
    if not await pool().run(lambda: exchange.closed, directory.verify_password,
                            address, password):
        return None
    user = directory.user(address)
    return user.address if user is not None else None


class _TimedExchange:
    """Passes challenges through and notes when the client's last answer was read."""

    def __init__(self, exchange, started: float):
        self._exchange = exchange
        self.last_input = started

    async def challenge(self, data: bytes) -> bytes:
        answer = await self._exchange.challenge(data)
        self.last_input = time.monotonic()
        return answer

    @property
    def closed(self) -> bool:
        return self._exchange.closed


class _Delayed(Mechanism):
    """A mechanism whose failures (``None``) come no sooner than ``failure_delay`` seconds
    after the AUTH command or the last answer to a challenge; successes come at once."""

    def __init__(self, advertised: bool = True, failure_delay: float = 1.0):
        super().__init__(advertised)
        self.failure_delay = failure_delay

    async def authenticate(self, session, exchange, initial):
        timed = _TimedExchange(exchange, time.monotonic())
        user = await self.check(session, timed, initial)
        if user is None:
            # The loop's clock and timers may run up to a millisecond early (uvloop counts whole
            # milliseconds): check against the system's monotonic clock until the time is up.
            deadline = timed.last_input + self.failure_delay
            while not exchange.closed and (remaining := deadline - time.monotonic()) > 0:
                await asyncio.sleep(remaining)  # holds no thread: the loop serves others
        return user

    async def check(self, session, exchange, initial) -> str | None:
        raise NotImplementedError


class Plain(_Delayed):
    """RFC 4616: ``authzid NUL authcid NUL password``; authzid empty or equal to authcid."""

    name = "PLAIN"

    async def check(self, session, exchange, initial):
        data = initial if initial is not None else await exchange.challenge(b"")
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise AuthSyntaxError()
        authzid, authcid, password = map(_text, parts)
        user = await check_password(session, exchange, authcid, password)
        if user is None or (authzid and authzid.lower() != user.lower()):
            return None  # acting as someone else is not supported
        return user


class Login(_Delayed):
    """The LOGIN mechanism: ``Username:`` then ``Password:`` (the user may come initially)."""

    name = "LOGIN"

    async def check(self, session, exchange, initial):
        username = initial if initial is not None else await exchange.challenge(b"Username:")
        password = await exchange.challenge(b"Password:")
        return await check_password(session, exchange, _text(username), _text(password))


def new_challenge(hostname: str) -> bytes:
    """A fresh RFC 2195 challenge: ``<random.timestamp@hostname>``."""
    return f"<{secrets.randbits(63)}.{int(time.time())}@{hostname}>".encode()


def cram_md5_digest(secret: str, challenge: bytes) -> str:
    """RFC 2195: the hex HMAC-MD5 of the challenge keyed with the shared secret."""
    return hmac.new(secret.encode("utf-8"), challenge, hashlib.md5).hexdigest()


class CramMD5(_Delayed):
    """RFC 2195. The response is ``<user> <hex digest>``; a user without a plaintext password
    (hash only) cannot use it and fails like a wrong password."""

    name = "CRAM-MD5"

    async def check(self, session, exchange, initial):
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
    return [cls(advertised=not _gated(session, settings, cls.name),
                failure_delay=settings["failure_delay"]) for cls in offered]


@hookimpl
def on_auth(session, mechanism, settings):
    if mechanism in SWITCHES and _gated(session, settings, mechanism):
        return ENCRYPTION_REQUIRED
    return None


@hookimpl
def esmtp_parameters(verb):
    return ["AUTH"] if verb == "MAIL" else []


@hookimpl
def on_mail_from(transaction):
    params = transaction.mail_params
    value = params.get("AUTH", "<>")
    if value == "<>":
        return None
    if xtext_decode(value or "") is None:
        return Reply(501, "5.5.4", "Malformed AUTH parameter: not xtext")
    # RFC 4954 5: a server that does not trust the client's word behaves as if it had sent
    # AUTH=<>, and passes on <> (the queue envelope, a relay): it never vouches for it.
    log.info("MAIL FROM AUTH=%s taken as AUTH=<>", value)
    params["AUTH"] = "<>"
    return None
