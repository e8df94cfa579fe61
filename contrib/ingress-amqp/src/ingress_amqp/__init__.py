"""ingress plugin ``amqp``: every accepted message on a RabbitMQ quorum queue before its 250.

The plugin answers the ``deliver`` hook before the builtin delivery. What the builtin would
write to its relay queue (with ``local = true``: every recipient's copy) is published to the
queue as one persistent message: body = the bytes of ``<id>.eml``, ``message_id`` = the queue
id, ``content_type`` = ``message/rfc822``, header ``x-ingress-envelope`` = the text of
``<id>.json``. ``250`` goes out only once the broker has confirmed the publish; anything else
(nack, no confirm within ``confirm_timeout``, a closed channel, no connection) is ``451 4.3.0``
and whatever this node wrote for the message (local Maildir copies) is removed again.

Memory: the message goes from the spool to the socket one frame (``frame_max``, 128 KiB by
default) at a time; the next frame is read only once the previous one is written. aio-pika's
own publish would hold the body about three times over (the body, its frames, the marshalled
buffer), so the publish is done here on aiormq's channel with its own sequence numbers and
confirmation futures; the versions this was written against are pinned in pyproject.toml.

Each server process (each worker, after the fork) has one connection and one channel with
publisher confirms. A broker that is down does not stop the start: the plugin logs the outage
once, answers ``451`` meanwhile and reconnects in the background with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources

import aio_pika
import aiormq
from aiormq.abc import ChannelFrame
from ingress import Reply, hookimpl
from ingress.delivery import (
    Delivered,
    envelope_text,
    expand,
    remove,
    store_mailboxes,
    trace_headers,
)
from ingress.errors import IngressError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from yarl import URL

__all__ = ["Amqp", "Broker", "plugin"]

log = logging.getLogger("ingress_amqp")

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
UNAVAILABLE = Reply(451, "4.3.0", "Queue unavailable, try again later")
NOT_CONFIRMED = Reply(451, "4.3.0", "Queue did not confirm the message, try again later")
FIRST_RETRY, LAST_RETRY = 0.5, 5.0  # seconds between connection attempts: doubling, capped


class QueueError(IngressError):
    """The queue exists but is not a durable quorum queue."""


class Unavailable(Exception):
    """No usable channel now."""


class Broker:
    """One connection and one confirming channel to the broker, kept up in the background."""

    def __init__(self, settings: dict):
        self.url = settings["url"]
        self.queue = settings["queue"]
        self.timeout = float(settings["confirm_timeout"])
        url = URL(self.url)
        self.where = f"{url.host}:{url.port}"  # for log lines: never the password
        self.connection = None
        self.channel = None  # aio-pika's channel
        self.underlay = None  # its aiormq channel, which publishes
        self.reconnecting: asyncio.Task | None = None
        self.closers: set[asyncio.Task] = set()  # connections being closed in the background
        self.closing = False

    @property
    def up(self) -> bool:
        return self.underlay is not None and not self.underlay.is_closed

    async def start(self) -> None:
        """Connect; a missing broker is an outage, a wrong queue a startup error."""
        try:
            await self._connect()
        except QueueError:
            raise
        except Exception as exc:
            self._outage(exc)

    async def _connect(self) -> None:
        connection = await aio_pika.connect(self.url, timeout=self.timeout)
        try:
            channel = await connection.channel(publisher_confirms=True)
            try:
                await channel.declare_queue(self.queue, durable=True,
                                            arguments={"x-queue-type": "quorum"})
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise QueueError(f"amqp: queue {self.queue!r} on {self.where} exists but is not "
                                 f"a durable quorum queue ({exc.args[0]})") from None
            underlay = await channel.get_underlay_channel()
        except BaseException:
            await _close_quietly(connection)
            raise
        self.connection, self.channel, self.underlay = connection, channel, underlay
        connection.close_callbacks.add(self._lost)
        channel.close_callbacks.add(self._lost)

    def _lost(self, sender, exc=None) -> None:
        if self.closing or self.connection is None:
            return
        self._outage(exc or "closed")
        connection, self.connection, self.channel, self.underlay = self.connection, None, None, None
        # The channel alone may be gone: close the connection too (in the background).
        closer = asyncio.get_running_loop().create_task(_close_quietly(connection))
        self.closers.add(closer)
        closer.add_done_callback(self.closers.discard)

    def _outage(self, reason) -> None:
        if isinstance(reason, BaseException):
            reason = str(reason) or type(reason).__name__
        log.warning("amqp: broker %s unavailable (%s); messages get 451 until it is back",
                    self.where, reason)
        self.reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = FIRST_RETRY
        started = asyncio.get_running_loop().time()
        reported = None
        while not self.closing:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except Exception as exc:
                # Someone replaced the queue meanwhile: say so (once), as at startup.
                if isinstance(exc, QueueError) and str(exc) != reported:
                    reported = str(exc)
                    log.error("%s", exc)
                delay = min(delay * 2, LAST_RETRY)
                continue
            elapsed = asyncio.get_running_loop().time() - started
            log.info("amqp: broker %s is back after %.1fs", self.where, elapsed)
            self.reconnecting = None
            return

    async def close(self) -> None:
        self.closing = True
        if self.reconnecting is not None:
            self.reconnecting.cancel()
            try:
                await self.reconnecting
            except asyncio.CancelledError:
                pass
        if self.connection is not None:
            connection, self.connection, self.underlay = self.connection, None, None
            await _close_quietly(connection)
        if self.closers:
            await asyncio.gather(*self.closers)

    async def publish(self, queue_id: str, parts, size: int, envelope: str) -> bool:
        """Publish the message made of *parts* (byte strings and objects with ``chunks()``),
        *size* bytes in all; True once the broker confirmed it, False on a nack. Raises
        :class:`Unavailable` (no channel, or it closed meanwhile) or ``TimeoutError`` (past
        ``confirm_timeout``, which bounds the whole publish)."""
        channel = self.underlay
        if channel is None or channel.is_closed:
            raise Unavailable
        deadline = asyncio.get_running_loop().time() + self.timeout
        properties = spec.Basic.Properties(
            delivery_mode=2, message_id=queue_id, content_type="message/rfc822",
            headers={"x-ingress-envelope": envelope})
        try:
            async with channel.lock:
                confirmation = await self._send(channel, properties, size, parts, deadline)
        except aiormq.exceptions.ChannelInvalidStateError:  # closed while we waited
            raise Unavailable from None
        try:
            result = await _outcome(confirmation, deadline)
        except aiormq.exceptions.DeliveryError:  # aiormq 7 fails the future on a nack
            return False
        return isinstance(result, spec.Basic.Ack)

    async def _send(self, channel, properties, size: int, parts, deadline) -> asyncio.Future:
        """Write the publish frame by frame (the caller holds the channel's lock, so no other
        publish interleaves); return the future of the broker's confirm. The next frame is read
        only once the previous one is written, so memory stays at a frame or two."""
        frame_size = channel.max_content_size
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirmation = channel.create_future()  # failed by aiormq if the channel closes
        channel.confirmations[tag] = confirmation
        started = False
        try:
            channel.write_queue.put_nowait(ChannelFrame.marshall(
                channel_number=channel.number,
                frames=[spec.Basic.Publish(exchange="", routing_key=self.queue),
                        ContentHeader(properties=properties, body_size=size)]))
            started = True
            for chunk in _frames(parts, frame_size):
                written = channel.create_future()
                channel.write_queue.put_nowait(ChannelFrame.marshall(
                    channel_number=channel.number, frames=[ContentBody(chunk)],
                    drain_future=written))
                await _outcome(written, deadline)
        except BaseException:
            channel.confirmations.pop(tag, None)
            confirmation.cancel()
            if not started:
                channel.delivery_tag -= 1
            elif not channel.is_closed:
                # Half a message on the channel spoils it: start afresh.
                self._lost(None, "publish interrupted")
            raise
        return confirmation


async def _outcome(future: asyncio.Future, deadline: float):
    """The result of an aiormq future, waited for until *deadline* without being cancelled by
    it: ``TimeoutError`` past it, :class:`Unavailable` if aiormq dropped the future (its channel
    closed), else the future's result or exception."""
    remaining = deadline - asyncio.get_running_loop().time()
    if not future.done():
        await asyncio.wait([future], timeout=max(remaining, 0))
    if not future.done():
        raise TimeoutError
    if future.cancelled():
        raise Unavailable
    exc = future.exception()
    if isinstance(exc, (asyncio.CancelledError, aiormq.exceptions.AMQPConnectionError,
                        aiormq.exceptions.ChannelClosed, ConnectionError)):
        raise Unavailable from exc
    return future.result()


async def _close_quietly(connection) -> None:
    try:
        await connection.close()
    except Exception:  # already gone: nothing more to close
        pass


def _frames(parts, size: int):
    """The message as body frames of at most *size* bytes."""
    for part in parts:
        if isinstance(part, bytes):
            for i in range(0, len(part), size):
                yield part[i:i + size]
        else:
            yield from part.chunks(size)


def _quiet_client_libraries() -> None:
    """aio-pika and aiormq log every lost connection with a traceback (and more at exit); the
    plugin logs each outage once itself."""
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class Amqp:
    """The plugin; the installed entry point is the module's :data:`plugin` instance."""

    def __init__(self) -> None:
        self.broker: Broker | None = None

    @hookimpl
    def config_schema(self):
        return json.loads(resources.files(__name__).joinpath("schema.json").read_text("utf-8"))

    @hookimpl
    async def startup(self, settings):
        _quiet_client_libraries()
        self.broker = Broker(settings)
        await self.broker.start()

    @hookimpl
    async def shutdown(self):
        if self.broker is not None:
            await self.broker.close()
            self.broker = None

    @staticmethod
    def limit(settings) -> int:
        return int(settings["max_message_mb"] * 1024 * 1024)

    @hookimpl
    def ehlo_keywords(self, settings):
        # The smaller of this and max_message_size is advertised (SIZE 0 would mean none).
        return [f"SIZE {max(self.limit(settings), 1)}"]

    @hookimpl
    def on_mail_from(self, transaction, settings):
        limit = self.limit(settings)
        if transaction.data_limit is None or transaction.data_limit > limit:
            transaction.data_limit = limit  # the core keeps no more than this
        declared = transaction.mail_params.get("SIZE") or ""
        if declared.isdigit() and int(declared) > limit:
            return TOO_BIG
        return None

    @hookimpl
    def on_data(self, message, settings):
        if message.oversized or message.size > self.limit(settings):
            return TOO_BIG
        return None

    @hookimpl(tryfirst=True)
    async def deliver(self, session, transaction, message, settings):
        recipients = expand(session, transaction)
        if settings["local"]:
            local, remote = [], recipients
        else:
            local = [r for r in recipients if r.local]
            remote = [r for r in recipients if not r.local]
        if not remote:
            return None  # only local mail: the builtin delivery writes it
        if not self.broker.up:
            return UNAVAILABLE
        mailboxes = []
        for rcpt in local:
            part, domain = session.directory.split(rcpt.address)
            mailboxes.append((domain, part.lower()))
        try:
            written = await asyncio.to_thread(store_mailboxes, session, transaction, message,
                                              mailboxes)
        except OSError as exc:
            log.error("queue id %s: storage failed: %s", transaction.id, exc)
            return Reply(451, "4.3.0", "Local storage error, try again later")
        try:
            reply = await self._publish(session, transaction, message, remote)
        except BaseException:
            remove(written)
            raise
        if reply is not None:
            await asyncio.to_thread(remove, written)
            return reply
        return Delivered(transaction.id, tuple(f"{p}@{d}" for d, p in mailboxes),
                         tuple(written), tuple(r.address for r in remote))

    async def _publish(self, session, transaction, message, remote) -> Reply | None:
        """Publish; ``None`` once confirmed, else the reply for the client."""
        header = trace_headers(transaction, False)
        envelope = envelope_text(session, transaction, remote)
        try:
            if await self.broker.publish(transaction.id, (header, message),
                                         len(header) + message.size, envelope):
                return None
            log.warning("queue id %s: the broker refused the message (nack)", transaction.id)
            return NOT_CONFIRMED
        except Unavailable:
            return UNAVAILABLE
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("queue id %s: no confirm from the broker within %gs", transaction.id,
                        self.broker.timeout)
            return NOT_CONFIRMED
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
            log.warning("queue id %s: publish failed: %s", transaction.id,
                        str(exc) or type(exc).__name__)
            return UNAVAILABLE


plugin = Amqp()
