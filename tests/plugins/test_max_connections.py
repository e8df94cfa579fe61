"""max_connections: connection limit+1 is greeted with 421 4.3.2 and closed; a freed slot is
served again; the count stays exact through concurrent connects and 1,000 aborted sessions.
The same for per_ip (421 4.7.0), per client address, also across two worker processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from ingress.keycounts import KeyCounts, clear_region, shared_table
from ingress.testing import SMTPRaw, eventually
from ingress_plugins.max_connections import address_key

REFUSED = (421, "4.3.2 mx.test Too many connections")
REFUSED_PER_IP = (421, "4.7.0 mx.test Too many connections from your address")


def config(limit: int, per_ip: int = 0, **plugins) -> dict:
    return {"directory": {"domains": ["example.test"]},
            "plugins": {"max_connections": {"limit": limit, "per_ip": per_ip}, **plugins}}


def hold(server, n: int, source: str | None = None) -> list:
    """Open *n* connections one after the other; return them with their greetings."""
    held = []
    for _ in range(n):
        raw = server.raw(source=source)
        held.append((raw, raw.reply()))
    return held


def close_all(held) -> None:
    """Served ones QUIT first: once the 221 is read, the server has released the slot (it does
    so in the same step as the 221, before it can accept anything new). Otherwise a closing
    connection could still be counted when the next round connects."""
    for raw, (code, _) in held:
        try:
            if code == 220:
                assert raw.cmd("QUIT")[0] == 221
        finally:
            raw.close()


def served_exactly(server, limit: int, deadline: float = 10.0, refused=REFUSED) -> None:
    """`limit` connections are served and the next one is refused. Sessions that are still
    dying may hold a slot for a moment, so fewer served is retried until *deadline*; more
    served than the limit fails at once (that would be a count that went too low)."""
    end = time.monotonic() + deadline
    while True:
        held = hold(server, limit + 1)
        try:
            codes = [reply[0] for _, reply in held]
            served = codes.count(220)
            assert served <= limit, f"{served} served with limit {limit}: the count leaked low"
            if served == limit:
                assert codes == [220] * limit + [421]
                assert held[-1][1] == refused
                assert held[-1][0].closed_by_server()
                return
            assert time.monotonic() < end, f"only {served} of {limit} slots came back"
        finally:
            close_all(held)
        time.sleep(0.2)


@pytest.mark.parametrize("disabled", [(), ("max_connections",)])
def test_limit_plus_one_is_refused_and_closed(ingress_server, disabled):
    server = ingress_server(config(3), disabled=disabled)
    held = hold(server, 4)
    try:
        codes = [reply for _, reply in held]
        if disabled:
            assert [c for c, _ in codes] == [220] * 4
            return
        assert [c for c, _ in codes[:3]] == [220] * 3
        assert codes[3] == REFUSED
        assert held[3][0].closed_by_server()
        assert "refused by max_connections: 421 4.3.2" in server.log()
        for raw, _ in held[:3]:  # the served ones are untouched
            assert raw.cmd("NOOP")[0] == 250
    finally:
        close_all(held)


def test_a_freed_slot_is_served_again(ingress_server):
    server = ingress_server(config(2))
    held = hold(server, 2)
    try:
        assert [reply[0] for _, reply in held] == [220, 220]
        with server.raw() as extra:
            assert extra.reply() == REFUSED
        with held.pop(0)[0] as leaving:  # one leaves properly ...
            assert leaving.cmd("QUIT")[0] == 221
        served_exactly(server, 1)  # ... its slot is free again, the other is still held
    finally:
        close_all(held)


def test_zero_is_unlimited(ingress_server):
    server = ingress_server(config(0))
    held = hold(server, 30)
    try:
        assert [reply[0] for _, reply in held] == [220] * 30
    finally:
        close_all(held)


async def greeting_of_concurrent(host: str, port: int, n: int) -> list[tuple[int, str]]:
    """Connect *n* clients at the same moment; read each greeting; keep all open until all
    greetings are in, then QUIT the served ones (see close_all) and close."""
    async def one():
        reader, writer = await asyncio.open_connection(host, port)
        line = (await reader.readline()).decode()
        return reader, writer, (int(line[:3]), line[4:].strip())

    results = await asyncio.gather(*(one() for _ in range(n)))
    for reader, writer, (code, _) in results:
        if code == 220:
            writer.write(b"QUIT\r\n")
            assert (await reader.readline()).startswith(b"221 ")
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    return [greeting for _, _, greeting in results]


def test_concurrent_connects_are_counted_exactly(ingress_server):
    server = ingress_server(config(10))
    for _ in range(3):
        greetings = asyncio.run(greeting_of_concurrent(server.host, server.port, 40))
        assert sum(code == 220 for code, _ in greetings) == 10
        assert [g for g in greetings if g[0] != 220] == [REFUSED] * 30
        served_exactly(server, 10)


# --- 1,000 aborted sessions -------------------------------------------------------------------

DATA_START = (b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n"
              b"Subject: never finished\r\n\r\nhalf a bo")


def rst(writer) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    writer.transport.abort()


# Ways a session ends abnormally; one session in 50 waits for the command timeout (slow), the
# others end within milliseconds, so that 1,000 of them take a few seconds.
QUICK = ("rst-at-once", "fin-at-once", "rst-mid-command", "rst-mid-data", "bad-commands",
         "half-close")


def kind_of(i: int) -> str:
    return "command-timeout" if i % 50 == 49 else QUICK[i % len(QUICK)]


async def aborted_session(host: str, port: int, kind: str) -> int | None:
    """One session that ends abnormally; returns its greeting code when it reads it."""
    reader, writer = await asyncio.open_connection(host, port)
    code = None
    try:
        if kind == "rst-at-once":  # gone before the greeting arrives
            rst(writer)
            return None
        if kind == "fin-at-once":  # greeting never read
            writer.close()
            return None
        code = int((await reader.readline())[:3] or 0)
        if kind == "rst-mid-command":
            writer.write(b"MAIL FROM:<a@exa")
            await writer.drain()
            rst(writer)
        elif kind == "rst-mid-data":
            writer.write(DATA_START)
            await writer.drain()
            for _ in range(5):
                await reader.readline()
            rst(writer)
        elif kind == "bad-commands":  # the server cuts it (limit 1): 500, 421, EOF
            writer.write(b"BOGUS\r\n")
            await reader.read()
        elif kind == "command-timeout":  # the server cuts it: 421, EOF
            writer.write(b"NOO")
            await reader.read()
        else:  # half-close after a pipelined QUIT
            writer.write(b"EHLO c\r\nQUIT\r\n")
            writer.write_eof()
            await reader.read()
        return code
    finally:
        if not writer.is_closing():
            writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def churn(host: str, port: int, sessions: int, concurrency: int) -> list:
    """*sessions* aborted sessions, *concurrency* at a time; returns (kind, result) for each."""
    todo = iter(range(sessions))
    results: list = []

    async def worker():
        for i in todo:  # the workers share one bounded iterator
            try:
                result = await asyncio.wait_for(aborted_session(host, port, kind_of(i)), 30)
            except (OSError, asyncio.TimeoutError) as exc:  # the server may reset us first
                result = type(exc).__name__
            results.append((kind_of(i), result))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def test_the_count_is_back_to_zero_after_1000_aborted_sessions(ingress_server):
    """Resets before and after the greeting, mid-command, mid-DATA, sessions the server cuts
    (bad commands, command timeout), refusals over the limit (10 at a time against 8 slots):
    afterwards exactly `limit` new sessions are served and the next is refused."""
    limit = 8
    server = ingress_server(config(limit, max_bad_commands={"limit": 1},
                                   command_timeout={"seconds": 0.3}))
    results = asyncio.run(churn(server.host, server.port, 1000, limit + 2))
    assert len(results) == 1000
    greeted = [result for kind, result in results if kind != "command-timeout"]
    assert greeted.count(220) > 100 and greeted.count(421) > 0, "both paths were exercised"
    served_exactly(server, limit)
    assert server.all_messages() == []


def test_serve_raises_its_open_file_limit(ingress_server):
    """Every connection is a file descriptor: the server lifts its soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard open file limit {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the server
    try:
        server = ingress_server(config(1000))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = (Path("/proc") / str(server.pid) / "limits").read_text()
    [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)]
    # logged from the event loop, so written at the end of its iteration: maybe after "ready"
    eventually(lambda: f"open file limit raised from 256 to {hard}" in server.log(),
               what="the log line of the raised limit")


# --- per_ip -------------------------------------------------------------------------------------

OTHER = "127.0.0.2"  # another client address on the loopback interface


@pytest.mark.parametrize("disabled", [(), ("max_connections",)])
def test_per_ip_plus_one_is_refused_while_another_address_is_served(ingress_server, disabled):
    server = ingress_server(config(0, per_ip=3), disabled=disabled)
    held = hold(server, 4)
    try:
        codes = [reply for _, reply in held]
        if disabled:
            assert [c for c, _ in codes] == [220] * 4
            return
        assert [c for c, _ in codes[:3]] == [220] * 3
        assert codes[3] == REFUSED_PER_IP
        assert held[3][0].closed_by_server()
        assert "refused by max_connections: 421 4.7.0" in server.log()
        others = hold(server, 3, source=OTHER)  # another address has slots of its own
        try:
            assert [reply[0] for _, reply in others] == [220] * 3
            with server.raw(source=OTHER) as extra:
                assert extra.reply() == REFUSED_PER_IP
        finally:
            close_all(others)
        for raw, _ in held[:3]:  # the served ones are untouched
            assert raw.cmd("NOOP")[0] == 250
    finally:
        close_all(held)


def test_per_ip_slots_are_given_back(ingress_server):
    server = ingress_server(config(0, per_ip=2))
    held = hold(server, 2)
    try:
        assert [reply[0] for _, reply in held] == [220, 220]
        with held.pop(0)[0] as leaving:
            assert leaving.cmd("QUIT")[0] == 221
        served_exactly(server, 1, refused=REFUSED_PER_IP)
    finally:
        close_all(held)
    served_exactly(server, 2, refused=REFUSED_PER_IP)


def test_the_per_ip_count_is_exact_after_1000_aborted_sessions(ingress_server):
    """The churn of the limit test, against per_ip: 10 at a time against 8 slots per address,
    with the server's limit above that. Afterwards exactly per_ip are served again."""
    per_ip = 8
    server = ingress_server(config(100, per_ip=per_ip, max_bad_commands={"limit": 1},
                                   command_timeout={"seconds": 0.3}))
    results = asyncio.run(churn(server.host, server.port, 1000, per_ip + 2))
    assert len(results) == 1000
    greeted = [result for kind, result in results if kind != "command-timeout"]
    assert greeted.count(220) > 100 and greeted.count(421) > 0, "both paths were exercised"
    served_exactly(server, per_ip, refused=REFUSED_PER_IP)
    assert server.all_messages() == []


def test_the_limit_refuses_before_per_ip_counts(ingress_server):
    """A connection the server's limit refuses is not counted for its address: afterwards that
    address still has its one slot."""
    server = ingress_server(config(2, per_ip=1))
    held = hold(server, 1) + hold(server, 1, source="127.0.0.3")
    try:
        assert [reply[0] for _, reply in held] == [220, 220]
        with server.raw(source=OTHER) as other:
            assert other.reply() == REFUSED  # the server's limit, not per_ip
        close_all([held.pop()])
        eventually(lambda: served_from(server, OTHER), what="a slot for 127.0.0.2")
    finally:
        close_all(held)


def served_from(server, source: str) -> bool:
    """Whether a connection from *source* is served; a refusal by the server's limit (the slot
    just freed may still be closing) is False, a per_ip refusal fails the test."""
    with server.raw(source=source) as raw:
        reply = raw.reply()
        assert reply != REFUSED_PER_IP
        if reply[0] == 220:
            assert raw.cmd("QUIT")[0] == 221
        return reply[0] == 220


def test_per_ip_holds_across_two_workers(ingress_server):
    """server.workers = 2: connections from one address are counted over both processes."""
    per_ip = 20  # enough that both workers get some: all on one has odds 2 ** -19
    server = ingress_server({**config(0, per_ip=per_ip, connection_count={"limit": 0}),
                             "server": {"workers": 2, "plugin_modules": ["connection_count"]}})
    held = hold(server, per_ip)
    try:
        greetings = [reply for _, reply in held]
        assert all(code == 220 for code, _ in greetings), greetings
        pids = {re.fullmatch(r"pid (\d+) connections \d+", text)[1] for _, text in greetings}
        assert len(pids) == 2, "both workers took connections"
        for _ in range(4):  # over per_ip, whichever worker takes it
            with server.raw() as extra:
                assert extra.reply() == REFUSED_PER_IP
                assert extra.closed_by_server()
        with server.raw(source=OTHER) as other:
            assert other.reply()[0] == 220
        close_all(held[:5])
        del held[:5]
        served_exactly(server, 5, refused=REFUSED_PER_IP)
    finally:
        close_all(held)


def test_a_dead_workers_per_ip_counts_are_forgotten(ingress_server):
    """A worker killed with connections open cannot give their counts back; its replacement
    starts from zero, so exactly the survivor's connections still count."""
    per_ip = 20
    server = ingress_server({**config(0, per_ip=per_ip, connection_count={"limit": 0}),
                             "server": {"workers": 2, "plugin_modules": ["connection_count"]}})
    held = hold(server, per_ip)
    try:
        pids = [re.fullmatch(r"pid (\d+) connections \d+", text)[1] for _, (_, text) in held]
        victim = pids[0]
        survivors = [pid for pid in pids if pid != victim]
        assert 0 < len(survivors) < per_ip, "both workers took connections"
        os.kill(int(victim), signal.SIGKILL)
        eventually(lambda: f"(pid {victim}) exited with -9" in server.log(),
                   what="the parent noticed")
        # At once, no retries: until the replacement listens every connection goes to the
        # survivor, which would still see the victim's counts had they not been cleared.
        free = per_ip - len(survivors)
        more = hold(server, free + 1)
        held += more
        assert [reply for _, reply in more] == [reply for _, reply in more[:free]] + [
            REFUSED_PER_IP]
        assert all(code == 220 for _, (code, _) in more[:free])
    finally:
        for raw, _ in held:
            raw.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_per_ip_over_ipv6(ingress_server):
    server = ingress_server({**config(0, per_ip=2), "server": {"listen": ["[::1]:0"]}})
    held = []
    try:
        for _ in range(3):
            raw = SMTPRaw("::1", server.port)
            held.append((raw, raw.reply()))
        assert [reply for _, reply in held][2] == REFUSED_PER_IP
        assert [reply[0] for _, reply in held][:2] == [220, 220]
    finally:
        close_all(held)


def test_the_address_key_groups_ipv6_by_64_and_maps_ipv4():
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("192.0.2.1") != address_key("192.0.2.2")
    assert address_key("::ffff:192.0.2.1") == address_key("192.0.2.1")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == address_key("2001:db8:1:2::1")
    assert address_key("2001:DB8:1:2:0:0:0:7") == address_key("2001:db8:1:2::1")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("::1") == "::/64"
    assert address_key("not an address") == "not an address"


def test_the_shared_count_table_stays_exact():
    """Two workers' counts in one shared table (the data structure workers use), small enough
    that probe runs collide and wrap: random opens and closes, compared after every step with
    plain counting, from both sides."""
    slots, keys = 16, [f"k{i}" for i in range(12)]
    table = shared_table(multiprocessing.get_context("fork"), 2, slots)
    workers = [KeyCounts(table, slot, 2, slots) for slot in range(2)]
    expected: list[dict[str, int]] = [{}, {}]
    rng = random.Random(12)
    for _ in range(20_000):
        w = rng.randrange(2)
        key = rng.choice(keys)
        if expected[w].get(key) and rng.random() < 0.5:
            workers[w].remove(key)
            expected[w][key] -= 1
            if not expected[w][key]:
                del expected[w][key]
        elif workers[w].add(key):
            expected[w][key] = expected[w].get(key, 0) + 1
        else:
            assert key not in expected[w] and len(expected[w]) == slots // 2
        for k in keys:
            total = expected[0].get(k, 0) + expected[1].get(k, 0)
            assert workers[0].total(k) == workers[1].total(k) == total
    clear_region(table, 0, slots)  # worker 0 died: its counts go, worker 1's stay
    for k in keys:
        assert workers[1].total(k) == expected[1].get(k, 0)
