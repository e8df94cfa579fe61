"""ingress plugin ``mailauth``: SPF, DKIM, ARC and DMARC for mail from unauthenticated sessions.

SPF (RFC 7208) is checked at MAIL when ``spf = "reject"`` (a ``fail`` is refused there), else at
the end of DATA. At the end of DATA every DKIM signature (RFC 6376, at most
:data:`MAX_SIGNATURES`), the ARC chain (RFC 8617) and DMARC (RFC 7489) are evaluated, and the
results go into one ``Authentication-Results:`` header (RFC 8601), the message's first line;
any such header already in the message with our authserv-id is removed (after the checks, which
see the message as received).

The libraries (pyspf, dkimpy) do their DNS synchronously; here they never touch the network.
DKIM and ARC keys and the DMARC record are fetched first with dnspython's asyncio resolver and
handed to dkimpy through a ``dnsfunc`` that answers from them. pyspf evaluates with a DNS
function that answers from a table and notes what it lacked; the missing names are fetched
and the evaluation runs again, at most :data:`MAX_SPF_RUNS` times. Each check waits for DNS at
most ``dns_timeout`` seconds; past that it is a ``temperror`` and the message goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import functools
import ipaddress
import json
import logging
import random
import re
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import dkim
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import spf
from dkim.util import InvalidTagValueList, parse_tag_value
from ingress import Reply, hookimpl, ipnets
from ingress.config import parse_host_port

log = logging.getLogger("ingress_mailauth")

NAME = "mailauth"
SPF_REJECT = Reply(550, "5.7.23", "SPF validation failed")
HEADER = "Authentication-Results"

MAX_SIGNATURES = 8  # DKIM signatures verified per message, topmost first; the rest are ignored
MAX_ARC_SETS = 16  # a longer ARC chain is a fail without verification (RFC 8617 allows 50)
MAX_SIGNED_FIELDS = 64  # h= longer than this: not verified (hashing cost grows with it)
MAX_VERIFY_SIZE = 32 << 20  # larger messages: dkim/arc neutral (dkimpy holds a message whole)
INLINE_SIZE = 128 << 10  # larger messages are parsed and verified in a worker thread
MAX_SPF_RUNS = 120  # evaluations of one SPF check (each fetches what the previous lacked)
MAX_SPF_NAMES = 64  # distinct DNS questions of one SPF check
MAX_VOID_LOOKUPS = 2  # RFC 7208 4.6.4
ARC_FIELDS = ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results")
MAX_FROM_LENGTH = 4096  # a longer From: field has no DMARC domain (permerror)

T = TypeVar("T")


@hookimpl
def config_schema():
    return json.loads(resources.files(__name__).joinpath("schema.json").read_text("utf-8"))


@hookimpl
def check_settings(settings):
    problems = []
    for i, entry in enumerate(settings["nameservers"]):
        try:
            nameserver(entry)
        except ValueError as exc:
            problems.append((f"/nameservers/{i}", str(exc)))
    return problems


def nameserver(entry: str) -> tuple[str, int]:
    """``(ip, port)`` of ``ip``, ``ip:port`` or ``[ipv6]:port``; ValueError saying what is wrong."""
    try:
        return str(_ip(entry)), 53
    except ValueError:
        pass
    host, port = parse_host_port(entry)
    try:
        return str(_ip(host)), port
    except ValueError:
        raise ValueError(f"{entry!r}: a nameserver is an IP address, not a host name") from None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --- the hooks --------------------------------------------------------------------------------


@hookimpl
async def on_mail_from(session, transaction, settings):
    if settings["spf"] != "reject" or session.auth_user:
        return None
    result = await check_spf(session, transaction, settings)
    transaction.notes[NAME] = {"spf": result}
    if result.result == "fail":
        log.info("mailauth: %s: SPF fail for %s from %s; refused at MAIL", transaction.id,
                 result.identity, session.peer_ip)
        return SPF_REJECT
    return None


@hookimpl
async def on_data(session, transaction, message, settings):
    if session.auth_user or message.oversized or message.failed:
        return None
    results = await evaluate(session, transaction, message, settings)  # on the received message
    ours = session.hostname.lower().rstrip(".")
    message.remove_headers(HEADER, lambda value: authserv_id(value) == ours)  # forged
    transaction.add_header(HEADER, results.header(session.hostname, settings), first=True)
    log.info("mailauth: %s: %s", transaction.id, results.summary(settings))
    dmarc_result = results.dmarc
    if settings["dmarc"] == "enforce" and dmarc_result.result == "fail":
        if dmarc_result.applied == "reject":
            return Reply(550, "5.7.1", f"Rejected by DMARC policy of {dmarc_result.domain}")
        if dmarc_result.applied == "quarantine":
            transaction.quarantine("dmarc")
    return None


# --- results and the header ------------------------------------------------------------------


@dataclass
class SPFResult:
    result: str
    kind: str = "mailfrom"  # or "helo"
    identity: str = ""  # the MAIL FROM address, or the HELO name
    domain: str = ""  # the domain checked (for DMARC alignment)


@dataclass
class Signature:
    result: str
    domain: str = ""
    selector: str = ""
    reason: str = ""


@dataclass
class DMARCResult:
    result: str
    domain: str = ""  # the From: domain
    policy: str = ""  # the policy that applies (p= or sp=)
    applied: str = ""  # the policy after pct=


@dataclass
class Results:
    spf: SPFResult
    signatures: list[Signature]
    arc: str
    dmarc: DMARCResult

    def methods(self, settings: dict) -> list[str]:
        found = []
        if settings["spf"] != "off":
            prop = f"smtp.{self.spf.kind}"
            found.append(f"spf={self.spf.result}"
                         + (f" {prop}={pvalue(self.spf.identity)}" if self.spf.identity else ""))
        if settings["dkim"] != "off":
            if not self.signatures:
                found.append("dkim=none")
            for sig in self.signatures:
                text = f"dkim={sig.result}"
                if sig.reason:
                    text += f" ({comment(sig.reason)})"
                if sig.domain:
                    text += f" header.d={pvalue(sig.domain)}"
                if sig.selector:
                    text += f" header.s={pvalue(sig.selector)}"
                found.append(text)
        if settings["dmarc"] != "off":
            text = f"dmarc={self.dmarc.result}"
            if self.dmarc.domain:
                text += f" header.from={pvalue(self.dmarc.domain)}"
            found.append(text)
        if settings["arc"] != "off":
            found.append(f"arc={self.arc}")
        return found

    def header(self, hostname: str, settings: dict) -> str:
        """The header's value: each method on a line of its own (folded with CRLF and a space,
        so unfolding gives ``id; spf=...; dkim=...``)."""
        return ";\r\n ".join([pvalue(hostname), *(self.methods(settings) or ["none"])])

    def summary(self, settings: dict) -> str:
        return "; ".join(self.methods(settings)) or "no checks"


_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+")


def pvalue(value: str) -> str:
    """*value* as an RFC 8601 property value: as is when it is a plain token (an address, a
    domain), else a quoted string."""
    value = value[:254]
    if _TOKEN.fullmatch(value):
        return value
    escaped = re.sub(r'(["\\])', r"\\\1", re.sub(r"[\x00-\x1f\x7f]", "", value))
    return f'"{escaped}"'


def comment(text: str) -> str:
    return re.sub(r"[()\\\x00-\x1f\x7f]", "", text)[:80]


def authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (comments and quotes dropped)."""
    value = value.lstrip()
    while value.startswith("("):  # a leading comment, as CFWS allows
        end = value.find(")")
        if end < 0:
            return ""
        value = value[end + 1:].lstrip()
    found = re.match(r'"([^"]*)"|([^\s;(]+)', value)
    if not found:
        return ""
    found_id = found.group(1) if found.group(1) is not None else found.group(2)
    return found_id.lower().rstrip(".")


# --- DNS ---------------------------------------------------------------------------------------


class TempFail(Exception):
    """DNS did not answer (timeout, SERVFAIL, no server reachable)."""


_resolvers: dict[tuple, dns.asyncresolver.Resolver] = {}


def resolver(settings: dict) -> dns.asyncresolver.Resolver:
    """One resolver per (nameservers, timeout) and process, with a small answer cache."""
    key = (tuple(settings["nameservers"]), settings["dns_timeout"])
    found = _resolvers.get(key)
    if found is None:
        if len(_resolvers) > 8:  # old generations after many reloads
            _resolvers.clear()
        if settings["nameservers"]:
            found = dns.asyncresolver.Resolver(configure=False)
            found.nameservers = [dns.nameserver.Do53Nameserver(*nameserver(entry))
                                 for entry in settings["nameservers"]]
        else:
            try:
                found = dns.asyncresolver.Resolver()
            except dns.exception.DNSException as exc:
                log.warning("mailauth: no usable /etc/resolv.conf (%s); every check will be "
                            "a temperror until nameservers are set", exc)
                found = dns.asyncresolver.Resolver(configure=False)
                found.nameservers = []
        found.timeout = found.lifetime = settings["dns_timeout"]
        found.cache = dns.resolver.LRUCache(4096)
        _resolvers[key] = found
    return found


async def query(res: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list:
    """The records of *name*; ``[]`` when it has none or does not exist; TempFail when DNS
    does not answer."""
    try:
        answer = await res.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN,
            dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
        return []
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise TempFail(type(exc).__name__) from None
    except dns.exception.DNSException as exc:
        raise TempFail(str(exc)) from None
    return list(answer.rrset or [])


async def txt(res, name: str) -> list[bytes]:
    return [b"".join(rdata.strings) for rdata in await query(res, name, "TXT")]


async def bounded(awaitable: Awaitable[T], timeout: float) -> T:
    """*awaitable* within *timeout* seconds, else TempFail."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise TempFail(f"no answer within {timeout:g}s") from None


# --- SPF ---------------------------------------------------------------------------------------


class _Lacking(spf.TempError):
    """A DNS answer not fetched yet: the evaluation stops, and runs again once it is."""


class _TableQuery(spf.query):
    """pyspf's evaluation, with DNS answered from *table* (``(name, type)`` -> answers, or
    None for a question DNS did not answer); questions not in it are noted in ``lacking``."""

    def __init__(self, table: dict, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.table = table
        self.lacking: set[tuple[str, str]] = set()

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key not in self.table:
            self.lacking.add(key)
            raise _Lacking(f"{name} {qtype} not fetched yet")
        answers = self.table[key]
        if answers is None:
            raise spf.TempError(f"DNS: no answer for {name} {qtype}")
        if not answers and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {MAX_VOID_LOOKUPS} exceeded")
        return list(answers)


def _spf_answers(rdtype: str, records: list) -> list:
    """dnspython records in the shapes pyspf's own DNS layer gives."""
    if rdtype in ("A", "AAAA"):
        return [r.address for r in records]
    if rdtype == "MX":
        return [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in records]
    if rdtype == "PTR":
        return [r.target.to_text(omit_final_dot=True) for r in records]
    return [tuple(r.strings) for r in records]  # TXT, SPF: a list of strings each


async def _fetch_spf(res, table: dict, key: tuple[str, str]) -> None:
    name, rdtype = key
    try:
        table[key] = _spf_answers(rdtype, await query(res, name, rdtype))
    except TempFail:
        table[key] = None


def _idna(domain: str) -> str | None:
    try:
        return domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def spf_identity(session, transaction) -> SPFResult | None:
    """What SPF checks (RFC 7208 2.4): the MAIL FROM domain, or the HELO name for ``<>``;
    None when there is nothing checkable."""
    if transaction.mail_from:
        local, _, domain = transaction.mail_from.rpartition("@")
        ascii_domain = _idna(domain) if local and domain and not domain.startswith("[") else None
        return SPFResult("none", "mailfrom", transaction.mail_from, ascii_domain or "")
    helo = (session.helo or "").strip()
    ascii_helo = _idna(helo) if helo and not helo.startswith("[") else None
    return SPFResult("none", "helo", helo, ascii_helo or "")


async def check_spf(session, transaction, settings) -> SPFResult:
    found = spf_identity(session, transaction)
    client = ipnets.client_ip(session.peer_ip)
    if not found.domain or "." not in found.domain or client is None:
        return found
    if found.kind == "mailfrom":
        sender = f"{found.identity.rpartition('@')[0]}@{found.domain}"
        helo = session.helo or ""
    else:
        sender, helo = "", found.domain
    res = resolver(settings)
    table: dict = {}

    async def run() -> str:
        for _ in range(MAX_SPF_RUNS):
            checker = _TableQuery(table, str(client), sender, helo, receiver=session.hostname)
            result, _, _ = checker.check()
            if not checker.lacking:
                return result
            if len(table) + len(checker.lacking) > MAX_SPF_NAMES:
                return "permerror"
            await asyncio.gather(*(_fetch_spf(res, table, key) for key in checker.lacking))
        return "permerror"

    try:
        found.result = await bounded(run(), settings["dns_timeout"])
    except TempFail:
        found.result = "temperror"
    except Exception:  # pyspf on input it never expected: one message, not the session
        log.warning("mailauth: %s: SPF evaluation failed", transaction.id, exc_info=True)
        found.result = "permerror"
    return found


# --- DKIM and ARC ------------------------------------------------------------------------------


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mailauth")
    return await asyncio.get_running_loop().run_in_executor(_pool, function, *args)


@hookimpl
def shutdown():
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None
    _resolvers.clear()


def _big_message_slot() -> asyncio.Semaphore:
    """At most two large messages held for verification at once (per process)."""
    loop = asyncio.get_running_loop()
    slot = _slots.get(loop)
    if slot is None:
        slot = _slots[loop] = asyncio.Semaphore(2)
    return slot


@dataclass
class Parsed:
    """A message read for verification and the key names its signatures need."""

    dkim: dkim.DKIM | None = None
    arc: dkim.ARC | None = None
    signatures: list[tuple[int, Signature, str]] = field(default_factory=list)  # idx, sig, key
    arc_keys: set[str] = field(default_factory=set)
    arc_result: str | None = None  # decided without verification


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return parse_tag_value(value)
    except (InvalidTagValueList, ValueError, IndexError):
        return {}


def _key_name(tags: dict[bytes, bytes]) -> str | None:
    try:
        selector = tags[b"s"].decode("ascii").strip()
        domain = tags[b"d"].decode("ascii").strip().rstrip(".")
    except (KeyError, UnicodeDecodeError):
        return None
    if not selector or not domain or len(selector) + len(domain) > 240:
        return None
    return f"{selector}._domainkey.{domain}".lower()


def _too_many_fields(tags: dict[bytes, bytes]) -> bool:
    return tags.get(b"h", b"").count(b":") >= MAX_SIGNED_FIELDS


def parse(message, want_dkim: bool, want_arc: bool) -> Parsed:
    raw = b"".join(message.chunks())
    parsed = Parsed()
    if want_dkim:
        try:
            parsed.dkim = dkim.DKIM(raw)
        except Exception:  # dkimpy refuses the message's syntax
            parsed.signatures = [
                (0, Signature("permerror", reason="unparsable message"), "")
                for _ in range(min(message.header_count("DKIM-Signature"), MAX_SIGNATURES))]
            want_dkim = False
    if want_dkim:
        values = [v for n, v in parsed.dkim.headers if n.lower() == b"dkim-signature"]
        for idx, value in enumerate(values[:MAX_SIGNATURES]):
            tags = _tags(value)
            sig = Signature("permerror", _text(tags.get(b"d")), _text(tags.get(b"s")))
            name = _key_name(tags)
            if name is None:
                sig.reason = "bad signature"
            elif _too_many_fields(tags):
                sig.reason = "too many signed fields"
            parsed.signatures.append((idx, sig, name or ""))
    if want_arc and not any(message.header_count(name) for name in ARC_FIELDS):
        parsed.arc_result = "none"
    elif want_arc:
        try:
            parsed.arc = dkim.ARC(raw)
        except Exception:  # dkimpy refuses the message's syntax
            parsed.arc_result = "fail" if message.header_count("ARC-Seal") else "none"
            return parsed
        seals = [v for n, v in parsed.arc.headers if n.lower() == b"arc-seal"]
        signed = [v for n, v in parsed.arc.headers if n.lower() == b"arc-message-signature"]
        if not seals and not signed:
            parsed.arc_result = "none"
        elif len(seals) > MAX_ARC_SETS or len(signed) > MAX_ARC_SETS:
            parsed.arc_result = "fail"
        else:
            for value in seals + signed:
                tags = _tags(value)
                name = _key_name(tags)
                if name is None or _too_many_fields(tags):
                    parsed.arc_result = "fail"
                    break
                parsed.arc_keys.add(name)
    return parsed


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", "replace").strip()[:253]


def verify(parsed: Parsed, keys: dict[str, bytes | None]) -> tuple[list[Signature], str | None]:
    """Check the signatures with *keys* (key name -> TXT record, None: none published)."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return keys.get(name.decode("ascii", "replace").rstrip(".").lower())

    signatures = []
    for idx, sig, name in parsed.signatures:
        signatures.append(sig)
        if sig.reason:
            continue
        if name not in keys:
            sig.result = "temperror"
            continue
        if keys[name] is None:
            sig.result, sig.reason = "permerror", "no key"
            continue
        if not _usable_key(keys[name]):
            sig.result, sig.reason = "permerror", "bad key"
            continue
        try:
            sig.result = "pass" if parsed.dkim.verify(idx, dnsfunc=dnsfunc) else "fail"
        except dkim.ValidationError as exc:
            sig.result, sig.reason = "fail", str(exc).split(" (")[0]
        except Exception as exc:  # dkimpy on a malformed signature or message
            sig.result, sig.reason = "permerror", type(exc).__name__
    arc_result = parsed.arc_result
    if parsed.arc is not None and arc_result is None:
        if any(name not in keys for name in parsed.arc_keys):
            arc_result = "temperror"
        else:
            try:
                chain, _, _ = parsed.arc.verify(dnsfunc=dnsfunc)
            except Exception:  # dkimpy on a malformed chain
                chain = dkim.CV_Fail
            arc_result = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(chain, "fail")
    return signatures, arc_result


async def fetch_keys(res, names: set[str], timeout: float) -> dict[str, bytes | None]:
    """The DKIM key record of each name (None: none published); a name DNS did not answer for
    within *timeout* is left out."""
    keys: dict[str, bytes | None] = {}

    async def one(name: str) -> None:
        try:
            records = await bounded(txt(res, name), timeout)
        except TempFail:
            return
        keys[name] = _pick_key(records)

    await asyncio.gather(*(one(name) for name in names))
    return keys


@functools.lru_cache(maxsize=256)
def _usable_key(record: bytes) -> bool:
    """Whether dkimpy can read the key record (else dkimpy would call it a plain fail)."""
    try:
        dkim.evaluate_pk("key", record)
    except (dkim.DKIMException, ValueError, TypeError):
        return False
    return True


def _pick_key(records: list[bytes]) -> bytes | None:
    if not records:
        return None
    for record in records:
        if record.lstrip().lower().startswith(b"v=dkim1"):
            return record
    return records[0]


async def check_signatures(message, settings, want_dkim: bool, want_arc: bool
                           ) -> tuple[list[Signature], str | None]:
    if not want_dkim and not want_arc:
        return [], None
    if message.size > MAX_VERIFY_SIZE:
        count = min(message.header_count("DKIM-Signature"), MAX_SIGNATURES)
        sigs = [Signature("neutral", reason="message too large") for _ in range(count)]
        arc = "none" if message.header_count("ARC-Seal") == 0 else "neutral"
        return sigs, arc if want_arc else None
    big = message.size > INLINE_SIZE
    async with _big_message_slot() if big else contextlib.nullcontext():
        if big:
            parsed = await _in_thread(parse, message, want_dkim, want_arc)
        else:
            parsed = parse(message, want_dkim, want_arc)
        names = {name for _, sig, name in parsed.signatures if not sig.reason} | parsed.arc_keys
        keys = await fetch_keys(resolver(settings), names, settings["dns_timeout"])
        if big:
            return await _in_thread(verify, parsed, keys)
        return verify(parsed, keys)


# --- DMARC -------------------------------------------------------------------------------------


def organizational_domain(domain: str) -> str:
    """The last two labels: no public suffix list (see the README)."""
    return ".".join(domain.split(".")[-2:])


def aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def from_domain(message) -> str | None:
    """The domain of the one author address (RFC 7489 6.6.1), or None."""
    values = [v for n, v in message.headers() if n.lower() == "from"]
    if len(values) != 1 or len(values[0]) > MAX_FROM_LENGTH:
        return None
    addresses = [a for _, a in email.utils.getaddresses(values) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return _idna(addresses[0].rpartition("@")[2])


def parse_dmarc(record: str) -> dict[str, str] | None:
    """The tags of a DMARC record, or None when it is not one (RFC 7489 6.4)."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    first = record.split(";", 1)[0].replace(" ", "").lower()
    return tags if first == "v=dmarc1" else None


async def dmarc_record(res, domain: str, timeout: float) -> tuple[dict | None, bool]:
    """``(tags, at the organizational domain)``; ``(None, False)`` when neither the From:
    domain nor its organizational domain publishes one record."""

    async def lookup(name: str) -> dict | None:
        records = [parse_dmarc(r.decode("utf-8", "replace")) for r in await txt(res, name)]
        records = [r for r in records if r is not None]
        return records[0] if len(records) == 1 else None  # several: none (RFC 7489 6.6.3)

    async def both() -> tuple[dict | None, bool]:
        found = await lookup(f"_dmarc.{domain}")
        if found is not None:
            return found, False
        org = organizational_domain(domain)
        if org != domain:
            found = await lookup(f"_dmarc.{org}")
            if found is not None:
                return found, True
        return None, False

    return await bounded(both(), timeout)


POLICIES = ("none", "quarantine", "reject")


def dmarc_result(domain: str | None, record: dict | None, at_org: bool, spf_result: SPFResult,
                 signatures: list[Signature]) -> DMARCResult:
    if domain is None:
        return DMARCResult("permerror")
    if record is None:
        return DMARCResult("none", domain)
    policy = record.get("p", "").lower()
    if at_org and "sp" in record:
        policy = record["sp"].lower()
    if policy not in POLICIES:
        if "rua" not in record:  # RFC 7489 6.6.3: no valid p= and nowhere to report
            return DMARCResult("permerror", domain)
        policy = "none"
    spf_mode = "s" if record.get("aspf", "r").lower() == "s" else "r"
    dkim_mode = "s" if record.get("adkim", "r").lower() == "s" else "r"
    spf_aligned = bool(spf_result.domain) and aligned(spf_result.domain, domain, spf_mode)
    dkim_aligned = [s for s in signatures if s.domain and aligned(s.domain, domain, dkim_mode)]
    if (spf_aligned and spf_result.result == "pass") or any(
            s.result == "pass" for s in dkim_aligned):
        return DMARCResult("pass", domain, policy, "none")
    if (spf_aligned and spf_result.result == "temperror") or any(
            s.result == "temperror" for s in dkim_aligned):
        return DMARCResult("temperror", domain, policy, "none")
    return DMARCResult("fail", domain, policy, _sampled(policy, record.get("pct", "100")))


def _sampled(policy: str, pct: str) -> str:
    """RFC 7489 6.6.4: the policy applies to pct% of failing mail; the rest gets the next
    milder one (reject -> quarantine -> none)."""
    try:
        percent = min(max(int(pct), 0), 100)
    except ValueError:
        percent = 100
    if percent >= 100 or random.random() * 100 < percent:
        return policy
    return POLICIES[max(POLICIES.index(policy) - 1, 0)]


# --- all of it ---------------------------------------------------------------------------------


async def _spf_for_data(session, transaction, settings) -> SPFResult:
    done = transaction.notes.get(NAME, {}).get("spf")
    if done is not None:
        return done
    return await check_spf(session, transaction, settings)


async def _dmarc_lookup(settings, domain: str | None) -> tuple[dict | None, bool] | None:
    """The record, or None when DNS did not answer."""
    if domain is None:
        return None, False
    try:
        return await dmarc_record(resolver(settings), domain, settings["dns_timeout"])
    except TempFail:
        return None


async def evaluate(session, transaction, message, settings) -> Results:
    want_dmarc = settings["dmarc"] != "off"
    want_spf = settings["spf"] != "off" or want_dmarc
    want_dkim = settings["dkim"] != "off" or want_dmarc
    want_arc = settings["arc"] != "off"
    domain = from_domain(message) if want_dmarc else None

    async def nothing() -> None:
        return None

    spf_result, (signatures, arc), record = await asyncio.gather(
        _spf_for_data(session, transaction, settings) if want_spf else nothing(),
        check_signatures(message, settings, want_dkim, want_arc),
        _dmarc_lookup(settings, domain) if want_dmarc else nothing())
    spf_result = spf_result or SPFResult("none")
    if not want_dmarc:
        dmarc = DMARCResult("none")
    elif record is None:
        dmarc = DMARCResult("temperror", domain or "")
    else:
        dmarc = dmarc_result(domain, record[0], record[1], spf_result, signatures)
    return Results(spf_result, signatures, arc or "none", dmarc)
