"""What the mailauth plugin costs per message: messages per second of 2 KB DKIM-signed messages
with and without it, in the same run.

Starts the DNS server of contrib/ingress-mailauth's tests (dnslib, a free UDP port of
127.0.0.1) serving sender.test's SPF record, a 2048-bit RSA DKIM key and a DMARC record, and two
ingress servers, one without the plugin and one with it (every check on, nameservers = that DNS
server). The messages are signed before the clock starts. Each round sends --messages messages
to each server (smtplib, --clients connections at once, each sending its share on one
connection), alternating the servers so that both see the same machine load; the best round of
each is reported. Run from the repository root with ingress and ingress-mailauth installed:

    python bench/mailauth.py --messages 300 --rounds 3 --clients 1

--ttl is the TTL of every DNS answer: with the default (300 s) the plugin's resolver cache
answers after the first message, as a local caching resolver would; --ttl 0 makes every message
ask the DNS server again (four to five queries: SPF, the key, the DMARC record).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "contrib" / "ingress-mailauth" / "tests"))

import dkim  # noqa: E402
from common import smtplib_rate  # noqa: E402
from conftest import Zone, rsa_key, serve, stop  # noqa: E402  (the tests' DNS server, reused)

from ingress.testing import server_config, start_subprocess  # noqa: E402

LOCAL = {"directory": {"domains": ["example.test"],
                       "domain_settings": {"example.test": {"catch_all": True}}}}
WORDS = (b"the quarterly report is attached and the figures for the northern region look "
         b"better than expected so we should talk about the budget on thursday ")
PASSED = (b"spf=pass smtp.mailfrom=alice@sender.test;\r\n dkim=pass header.d=sender.test "
          b"header.s=sel;\r\n dmarc=pass header.from=sender.test;\r\n arc=none")


def message(n: int, key) -> bytes:
    """About 2 KB of ordinary text mail, its own Message-ID, DKIM-signed by sender.test."""
    head = (f"From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\n"
            f"Subject: report {n}\r\nMessage-ID: <bench-{n}@sender.test>\r\n"
            "Date: Sun, 06 Dec 2026 15:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    body = b""
    while len(head) + len(body) < 2048 - 620:  # the signature header is about 620 bytes
        body += WORDS[:76] + b"\r\n"
    unsigned = head + body
    return dkim.sign(unsigned, b"sel", b"sender.test", key.private) + unsigned


def run(server, messages: list[bytes], clients: int) -> float:
    """Messages per second for *messages* over *clients* connections."""
    return smtplib_rate(server.host, server.port, messages, clients, helo="client.sender.test",
                        sender="alice@sender.test", recipient="bob@example.test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--ttl", type=int, default=300, help="TTL of every DNS answer")
    args = parser.parse_args()
    key = rsa_key(2048)
    zone = Zone(ttl=args.ttl)
    zone.txt["sender.test"] = ["v=spf1 ip4:127.0.0.1 -all"]
    zone.txt["sel._domainkey.sender.test"] = [key.record]
    zone.txt["_dmarc.sender.test"] = ["v=DMARC1; p=reject"]
    dns_server, dns_thread, nameserver = serve(zone)
    messages = [message(n, key) for n in range(args.messages)]
    print(f"{len(messages)} messages of {len(messages[0])} bytes, signed")
    with tempfile.TemporaryDirectory(prefix="mailauth-bench-") as tmp:
        root = Path(tmp)
        servers = {}
        try:
            plugin = {"mailauth": {"nameservers": [nameserver], "dmarc": "enforce"}}
            for name, plugins in (("without", {}), ("with", plugin)):
                servers[name] = start_subprocess(
                    server_config(root / name, {**LOCAL, "plugins": plugins}), root / name)
            for server in servers.values():  # warm up (imports, the first lookups)
                run(server, messages[:5], 1)
            best = dict.fromkeys(servers, 0.0)
            for round_ in range(args.rounds):
                for name, server in servers.items():
                    rate = run(server, messages, args.clients)
                    best[name] = max(best[name], rate)
                    print(f"round {round_ + 1}: {name:7} mailauth: {rate:7.1f} msg/s")
            cost_ms = 1000 / best["with"] - 1000 / best["without"]
            print(f"best of {args.rounds}, {args.messages} messages of 2 KB, {args.clients} "
                  f"client(s), DNS TTL {args.ttl}s: without {best['without']:.1f} msg/s, with "
                  f"{best['with']:.1f} msg/s ({cost_ms * args.clients:+.2f} ms per message per "
                  "connection)")
            stored = list((root / "with" / "mail").glob("*/*/new/*"))
            passed = sum(PASSED in p.read_bytes() for p in stored)
            print(f"with mailauth: {len(stored)} delivered, {passed} with spf, dkim and dmarc "
                  f"pass; {len(zone.questions)} DNS questions")
        finally:
            for server in servers.values():
                server.stop()
            stop(dns_server, dns_thread)


if __name__ == "__main__":
    main()
