"""Every hook an ingress plugin can implement, grouped by phase.

Plugin authors read this module; they import :data:`ingress.hookimpl`, not these specs.

How hooks are called
--------------------
* Each specification declares how the core calls it: ``@spec(DECIDE)``, ``@spec(FIRST)`` or
  ``@spec(COLLECT)`` (below); the dispatcher reads the declaration, call sites name only the hook.
  The annotations say what each argument is and what an implementation returns (an ``async def``
  implementation returns it from its coroutine).
* Every hook receives ``settings``: the plugin's own config section (``[plugins.<name>]``), already
  validated and defaulted. A hook implementation may declare any subset of the arguments.
* Every hook but the lifecycle ones (``config_schema``, ``check_settings``, ``startup``,
  ``config_loaded``, ``shutdown``) may also declare ``state``: the
  plugin's own :class:`ingress.state.Store` (``server.state``: in memory, or on Redis shared by
  every worker and node), a key-value store with expiry whose keys no other plugin sees. An
  operation that fails or takes over ``server.state_timeout`` raises
  :class:`ingress.state.StateUnavailable` and the hook fails closed (``451 4.3.0``; the outage is
  logged once, not per command).
* Any implementation may be ``async def``; the core awaits it. Plain functions are called without
  creating a coroutine. A plain function that only sometimes has to wait may return an awaitable
  (e.g. a coroutine) in those cases; the core awaits it like an ``async def`` result.
* **Decision hooks** (``on_*`` below, unless said otherwise) return ``None`` to let the next plugin
  decide, or a :class:`ingress.Reply`. The core calls the implementations one at a time and stops at
  the first refusal (4xx/5xx); it remembers which plugin gave it (logs, metrics). A positive reply
  from a third-party plugin vouches for the command: later third-party implementations are
  skipped, the builtins' checks still run, the core still records the sender or recipient or
  stores the message, and the voucher is sent instead of the core's own success reply.
* Order: builtins run in the contract's order of checks (``ingress.dispatch.BUILTIN_ORDER``);
  third-party implementations run after the builtins, before them when marked
  ``@hookimpl(tryfirst=True)``, last when marked ``@hookimpl(trylast=True)``; among themselves in
  registration order. ``hookwrapper=True`` and ``wrapper=True`` are refused at registration.
* A plugin that raises, or whose hook waits longer than ``server.hook_timeout``, fails closed: the
  error is logged with plugin and hook name, and the client gets ``451 4.3.0`` for that command.
* One plugin object per process, for the life of the process: a module is itself; an entry
  point that names a class is instantiated once, when first loaded. A reload (SIGHUP) never
  imports or instantiates a plugin again: the same object serves every config generation, so
  its attributes (a client, a cache) outlive reloads, while each call brings the ``settings`` of
  the generation the session started with. ``startup`` runs once per object and process,
  ``config_loaded`` once per generation, ``shutdown`` once at exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ingress.auth import Mechanism
    from ingress.config import Config
    from ingress.delivery import Delivered
    from ingress.reply import Reply
    from ingress.session import Recipient, Session, Transaction
    from ingress.spool import Message
    from ingress.state import Store

hookspec = pluggy.HookspecMarker("ingress")

# How the core calls a hook, declared with its specification (see spec()) and carried out by
# ingress.dispatch.Hooks.call.
DECIDE = "decide"  # a decision: implementations one at a time, the first refusal wins
FIRST = "first"  # the first non-None result wins, the rest do not run
COLLECT = "collect"  # every implementation runs; the non-None results are used (or ignored)
SEMANTICS = (DECIDE, FIRST, COLLECT)


def spec(semantics: str):
    """Mark a function as a hook specification that the core calls with *semantics*."""
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown hook semantics {semantics!r}")

    def mark(function):
        function.ingress_semantics = semantics
        return hookspec(function)

    return mark


def semantics_of(name: str) -> str:
    """The declared semantics of the hook *name* (``KeyError`` for an unknown hook)."""
    function = globals().get(name)
    if function is None or not hasattr(function, "ingress_spec"):
        raise KeyError(f"no hook named {name!r}")
    if not hasattr(function, "ingress_semantics"):
        raise TypeError(f"hook {name} declares no semantics: mark it @spec(DECIDE), "
                        "@spec(FIRST) or @spec(COLLECT), not @hookspec")
    return function.ingress_semantics


# --- lifecycle -------------------------------------------------------------------------------


@spec(COLLECT)
def config_schema(settings: None) -> dict[str, Any] | None:
    """Return the JSON Schema (draft 2020-12, a dict) of this plugin's config section.

    Called once per config load, before validation (``settings`` is then ``None``). Return
    ``None`` when the plugin takes no settings; its section must then be empty. All results are
    used: each plugin's schema becomes ``properties.plugins.properties.<name>``.
    """


@spec(COLLECT)
def ehlo_keywords(session: Session, settings: dict[str, Any], state: Store) -> list[str] | None:
    """Return extension keywords this plugin adds to the EHLO reply (a list of strings).

    :param session: the :class:`ingress.session.Session`.
    All results are used, in dispatch order, after the core's own keywords. A plugin that
    enforces a message size limit of its own may add ``SIZE <n>`` too: the client sees one
    ``SIZE``, the smallest fixed limit of them all.
    """


@spec(COLLECT)
def esmtp_parameters(
    session: Session,
    verb: str,
    settings: dict[str,
    Any],
    state: Store,
) -> list[str] | None:
    """Return the MAIL or RCPT parameter names (upper case) this plugin understands.

    :param verb: ``"MAIL"`` or ``"RCPT"``.
    All results are used. A parameter that no plugin (nor the core: ``BODY``) claims is refused with
    ``555 5.5.4``. The plugin validates the values itself in ``on_mail_from`` / ``on_rcpt``.
    """


@spec(FIRST)
def greeting(session: Session, settings: dict[str, Any], state: Store) -> str | None:
    """Return the greeting text (without ``220``), or ``None``. First non-``None`` result wins.

    Runs after ``on_connect`` has not refused the connection. Without any implementation the
    greeting is ``<hostname> ESMTP``.
    """


@spec(COLLECT)
def check_settings(
    base_dir: Path,
    settings: dict[str, Any],
) -> list[str | tuple[str, str]] | None:
    """Check this plugin's settings beyond what its schema can say (a relation between two keys,
    a file that must exist, a pattern that must compile). Must be a plain ``def``: it runs
    outside the event loop, whenever a config is loaded: by ``ingress check-config``, at start
    and at every reload. Must not change anything (``check-config`` runs it too).

    Return ``None`` or an empty list when the settings are fine, else a list of problems, each
    a ``(pointer, message)`` pair, the pointer a JSON pointer inside the plugin's section
    (``"/expire_seconds"``, ``"/lists/0"``; ``""`` for the whole section), or a message alone
    for the whole section. Each becomes one config error line
    ``FILE: /plugins/<name><pointer>: message``; any problem refuses the config (a reload keeps
    the old one). An exception is reported the same way, naming the plugin.

    :param settings: the plugin's section, validated by its schema and defaulted.
    :param base_dir: the folder of the config file: relative paths in settings are relative to it.
    """


@spec(COLLECT)
def startup(config: Config, settings: dict[str, Any]) -> None:
    """This process is about to serve with this plugin for the first time: at start (each worker
    process, after the fork), before the listeners open, for every plugin the config activates;
    for a plugin that a reload activates, at that reload, before any session uses it. Runs once
    per plugin object and process. All implementations run, in order; may be ``async def``.
    Connect to outside services here.

    Raise :class:`ingress.errors.IngressError` to refuse to start: its lines are printed and the
    server exits 2 (any other exception is reported the same way, naming the plugin); at a
    reload, the reload is refused and the old config kept. A service that is merely down should
    not stop the start: log it and retry in the background.
    :param config: the :class:`ingress.config.Config` the plugin starts with.
    """


@spec(COLLECT)
def config_loaded(config: Config, settings: dict[str, Any]) -> None:
    """A config generation is about to serve new sessions: at start (after every ``startup``)
    and after every accepted reload (SIGHUP), once per process, for every plugin it activates.
    All implementations run; may be ``async def``. React to changed settings here (reopen a
    file, resize a pool); sessions that are already open keep their own generation and its
    ``settings``.

    At start an exception refuses the start as in ``startup``. At a reload the new settings
    have already passed ``check_settings``, so the reload goes ahead: an exception is logged
    with the plugin's name and the plugin's hooks run with the new settings all the same.
    :param config: the new :class:`ingress.config.Config`.
    """


@spec(FIRST)
def per_domain_statistics(config: Config, settings: dict[str, Any]) -> bool | None:
    """May the server keep statistics per local domain (metrics series labelled with a
    domain)? ``True``, ``False`` or ``None`` (no opinion); the first non-``None`` answer wins and
    no answer means yes. Asked once per config generation and process, after ``config_loaded``.
    The builtin ``relay`` plugin says no for an open relay (``allow = "anyone"``).
    :param config: the :class:`ingress.config.Config` of the generation.
    """


@spec(COLLECT)
def shutdown(settings: dict[str, Any]) -> None:
    """The server has drained its sessions and is about to exit. Runs once per plugin object that
    had its ``startup`` in this process, with its latest settings, including a plugin a reload
    has since deactivated. All implementations run; close connections cleanly here. Errors are
    logged."""


# --- connection ------------------------------------------------------------------------------


@spec(COLLECT)
def connection_opened(session: Session, settings: dict[str, Any], state: Store) -> None:
    """A client connected; runs before ``on_connect`` decides anything. All implementations run;
    return values are ignored. The counterpart of ``on_disconnect``: each runs exactly once per
    connection, whatever ``on_connect`` answers, so observers (counters, logs) see every
    connection, refused ones included. Not for decisions: use ``on_connect``."""


@spec(DECIDE)
def on_connect(session: Session, settings: dict[str, Any], state: Store) -> Reply | None:
    """A client connected. Decision hook: a ``Reply`` replaces the greeting (e.g. ``421`` with
    ``close=True``); a refusal ends the hook: the implementations after it do not run (a plugin
    that only wants another greeting text implements ``greeting``).

    Plugins that need timers set them here with ``session.set_timeout(kind, seconds)`` (the core
    runs the clock; see :meth:`ingress.session.Session.set_timeout`, and
    :meth:`~ingress.session.Session.set_min_data_rate`). ``session.connections`` is the number of
    open connections, this one included; :meth:`~ingress.session.Session.count_concurrent`
    counts open connections per key (say, per client address), across workers too.
    """


@spec(COLLECT)
def on_disconnect(session: Session, settings: dict[str, Any], state: Store) -> None:
    """The connection is gone (client quit, was cut, or timed out). All implementations run;
    return values are ignored. Runs exactly once per connection."""


@spec(DECIDE)
def on_command(
    session: Session,
    verb: str,
    arg: str,
    settings: dict[str,
    Any],
    state: Store,
) -> Reply | None:
    """A complete command line arrived (any verb, also unknown ones). Decision hook: a ``Reply``
    answers the command instead of the core.

    :param verb: the upper-cased verb (may be ``""`` or garbage).
    :param arg: the rest of the line (a ``str``; undecodable bytes are escaped).
    """


@spec(DECIDE)
def on_reply(
    session: Session,
    reply: Reply,
    plugin: str,
    settings: dict[str,
    Any],
    state: Store,
) -> Reply | None:
    """A reply is about to be sent. Decision hook: a ``Reply`` returned here is sent *after*
    ``reply`` (e.g. ``421 ... close``) — used to count errors.

    :param reply: the :class:`ingress.Reply` going out.
    :param plugin: the name of the plugin that gave it, or ``"core"``.
    """


@spec(DECIDE)
def on_helo(
    session: Session,
    verb: str,
    hostname: str,
    settings: dict[str,
    Any],
    state: Store,
) -> Reply | None:
    """HELO or EHLO. Decision hook: a ``Reply`` refuses it.

    :param verb: ``"HELO"`` or ``"EHLO"``.
    :param hostname: the argument as given.
    """


@spec(COLLECT)
def auth_mechanisms(
    session: Session,
    settings: dict[str,
    Any],
    state: Store,
) -> list[Mechanism] | None:
    """Return a list of :class:`ingress.auth.Mechanism` this plugin offers on this session.

    All results are used. A mechanism with ``advertised=False`` is known but not offered; the
    ``on_auth`` decision decides how to answer it (e.g. ``538`` without TLS).
    """


@spec(DECIDE)
def on_auth(
    session: Session,
    mechanism: str,
    settings: dict[str,
    Any],
    state: Store,
) -> Reply | None:
    """AUTH <mechanism> was asked for. Decision hook: a ``Reply`` refuses it before the exchange.

    :param mechanism: the upper-cased mechanism name.
    """


@spec(DECIDE)
def on_vrfy(session: Session, address: str, settings: dict[str, Any], state: Store) -> Reply | None:
    """VRFY <address>. Decision hook; without a reply the core answers ``252 2.5.2``.

    :param address: the argument as the client gave it (UTF-8 allowed), without angle brackets
        and without a trailing ``SMTPUTF8`` parameter (RFC 6531 3.7.4.2)."""


@spec(DECIDE)
def on_expn(session: Session, address: str, settings: dict[str, Any], state: Store) -> Reply | None:
    """EXPN <address>. Decision hook; without a reply the core answers ``502 5.5.1``.

    :param address: as for :func:`on_vrfy`."""


@spec(FIRST)
def continue_after_disconnect(
    session: Session,
    settings: dict[str,
    Any],
    state: Store,
) -> bool | None:
    """The client's end-of-stream was seen while messages are still to be processed. Return
    ``True`` to process what it already sent and deliver it, ``False`` to discard. First
    non-``None`` result wins; without one the message is discarded.

    Asked once per complete message (final dot or last BDAT chunk received) before it is
    stored; what the client sent before it closed (or reset) the connection is processed in
    order either way."""


# --- transaction -----------------------------------------------------------------------------


@spec(FIRST)
def may_relay(
    session: Session,
    transaction: Transaction | None,
    address: str,
    settings: dict[str, Any],
    state: Store,
) -> bool | None:
    """May this session send mail to *address* (a ``str``, not necessarily a recipient it
    named)? Return ``True`` (yes), ``False`` (no) or ``None`` (no opinion). First non-``None``
    result wins; without one the answer is no.

    Asked by plugins that would send mail of their own on the client's behalf (the ``dsn``
    plugin's success reports to MAIL FROM), so that they follow the relay policy without
    knowing it. The builtin ``relay`` plugin answers with its rules; a third-party policy that
    must decide before it uses ``@hookimpl(tryfirst=True)``. Called outside the command loop:
    it never answers the client.
    """


@spec(DECIDE)
def on_mail_from(
    session: Session,
    transaction: Transaction,
    settings: dict[str, Any],
    state: Store,
) -> Reply | None:
    """MAIL FROM. Decision hook.

    :param transaction: the new :class:`ingress.session.Transaction` (``mail_from``,
        ``mail_params``); it becomes the session's transaction unless a reply refuses it.
    """


@spec(DECIDE)
def on_rcpt(
    session: Session,
    transaction: Transaction,
    recipient: Recipient,
    settings: dict[str, Any],
    state: Store,
) -> Reply | None:
    """RCPT TO. Decision hook.

    :param recipient: the :class:`ingress.session.Recipient` (``address``, ``params``, ``local``);
        it is added to the transaction unless a reply refuses it.
    """


@spec(DECIDE)
def on_data(
    session: Session,
    transaction: Transaction,
    message: Message,
    settings: dict[str, Any],
    state: Store,
) -> Reply | None:
    """The message was received (the final dot of DATA, or the last BDAT chunk: plugins
    cannot tell which). Decision hook: a ``Reply`` refuses the message.

    :param message: the :class:`ingress.spool.Message` (raw bytes as received, ``headers()``,
        ``decoded_headers()``, ``oversized``). Plugins add headers with
        ``transaction.add_header(name, value)``, edit the message with ``message.change_header``,
        ``remove_header``, ``insert_header``, ``append_header``, ``replace_body``, and the
        envelope with ``transaction.add_recipient``, ``remove_recipient``, ``change_sender``,
        ``quarantine`` (docs/hooks.md, "Editing the message").
    """


# --- delivery --------------------------------------------------------------------------------


@spec(FIRST)
def deliver(
    session: Session,
    transaction: Transaction,
    message: Message,
    settings: dict[str, Any],
    state: Store,
) -> Delivered | Reply | None:
    """Store the message durably. First non-``None`` result wins; the builtin Maildir/queue
    delivery runs last.

    Return a :class:`ingress.delivery.Delivered` once the message is durable (the core then
    answers ``250``), or a ``Reply`` to refuse (e.g. ``451 4.3.0``). May be ``async def``; a
    blocking implementation should use ``asyncio.to_thread``.
    """


@spec(COLLECT)
def after_delivery(
    session: Session,
    transaction: Transaction,
    message: Message,
    delivered: Delivered,
    settings: dict[str, Any],
    state: Store,
) -> None:
    """The message was stored and ``250`` is on its way. All implementations run; errors are
    logged, never shown to the client (e.g. success DSNs)."""
