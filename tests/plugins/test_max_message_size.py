"""max_message_size: SIZE in EHLO and MAIL, the end-of-DATA measurement with the base64
allowance, oversized DATA read and discarded, and a 200 MB message in bounded memory."""

from __future__ import annotations

import base64
import email
import os
import re
import threading
import time
from pathlib import Path

import pytest

from ingress.testing import eventually
from ingress_plugins import max_message_size
from ingress_plugins.max_message_size import Base64Measure

LOCAL = {"directory": {"domains": ["example.test"],
                       "users": [{"address": "alice@example.test", "password": "x"}]}}
RCPT = "alice@example.test"
MB = 1 << 20


def config(kb: int, allowance: bool = True) -> dict:
    return {**LOCAL, "plugins": {"max_message_size": {"kb": kb, "base64_allowance": allowance}}}


def b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def attachment_message(decoded: bytes, text: str = "See the attachment.\r\n") -> bytes:
    return (b"From: a@example.org\r\nTo: alice@example.test\r\nSubject: file\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\n" + text.encode() + b"\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64_lines(decoded) + b"--b1--\r\n")


def text_message(size: int) -> bytes:
    head = b"From: a@example.org\r\nTo: alice@example.test\r\nSubject: text\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


def send(client, data: bytes) -> tuple[int, bytes]:
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt(RCPT)[0] == 250
    return client.data(data)


# --- the measurement, without a server ---------------------------------------------------------


def measured(data: bytes, chunk: int) -> int:
    counter = Base64Measure()
    for i in range(0, len(data), chunk):
        counter.feed(data[i:i + chunk])
    return counter.finish()


CHUNKS = (1, 2, 3, 5, 77, 999, 1000, 1001, 4096, 1 << 30)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_base64_parts_count_decoded_in_any_chunking(chunk):
    payload = bytes(range(256)) * 40
    encoded = b64_lines(payload)
    data = attachment_message(payload)
    assert measured(data, chunk) == len(data) - len(encoded) + len(payload)


def nested_message() -> tuple[bytes, int]:
    """multipart/mixed > (text, multipart/alternative > (text, base64 html), message/rfc822 >
    multipart > base64 image), with preamble, epilogue and transport padding; and the size of
    all encoded text minus the decoded size."""
    a, b = b"<p>hello</p>" * 100, bytes(range(256)) * 13
    ea, eb = b64_lines(a), b64_lines(b)
    data = (
        b"Subject: nested\r\nContent-Type: multipart/mixed;\r\n boundary=\"outer\"\r\n\r\n"
        b"preamble\r\n--outer\r\n\r\nplain text part\r\n"
        b"--outer \t\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
        b"--inner\r\nContent-Type: text/plain\r\n\r\n--not a boundary\r\n"
        b"--inner\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: BASE64\r\n\r\n"
        + ea + b"--inner--\r\nepilogue of inner\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: forwarded\r\nContent-Type: multipart/related; boundary=\"fw\"\r\n\r\n"
        b"--fw\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + eb + b"--fw--\r\n--outer--\r\nepilogue\r\n"
    )
    return data, len(ea) + len(eb) - len(a) - len(b)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_nested_multiparts_and_enclosed_messages(chunk):
    data, saved = nested_message()
    assert measured(data, chunk) == len(data) - saved
    # cross-check the decoded sizes with the email package
    parsed = email.message_from_bytes(data)
    decoded = [len(p.get_payload(decode=True)) for p in parsed.walk()
               if p.get("Content-Transfer-Encoding", "").lower() == "base64"]
    assert sorted(decoded) == [1200, 3328]


@pytest.mark.parametrize("data", [
    b"",
    b"no header at all, no newline",
    b"Subject: x\r\n",  # header only
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!! not base64 ####\r\n",
    b"Content-Type: multipart/mixed\r\n\r\n--x\r\nno boundary parameter\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n"
    b"never closed\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n--x\r\n--x--\r\n--x--\r\n",
    b"Content-Type: multipart/mixed; boundary=\"\xff\xfe\"\r\n\r\n--\xff\xfe\r\n\r\nx\r\n",
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\n" * 50 + b"-" * 5000,
    b"X: " + b"y" * 5000 + b"\r\n\r\nbody\r\n",  # an over-long header line
    b"Bad header line\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n",
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"\n--a\n" * 3 + b"\r\r\n",
])
@pytest.mark.parametrize("chunk", (1, 3, 64, 1 << 30))
def test_malformed_mime_is_measured_without_error(data, chunk):
    result = measured(data, chunk)
    assert 0 <= result <= len(data)
    assert result == measured(data, 1 << 30)


def test_a_base64_part_without_a_closing_boundary_counts_to_the_end():
    payload = b"z" * 3000
    data = (b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64_lines(payload))
    assert measured(data, 100) == len(data) - len(b64_lines(payload)) + len(payload)


def test_a_message_made_to_be_slow_falls_back_to_raw(monkeypatch):
    monkeypatch.setattr(max_message_size, "BUDGET", 100)
    data = (b"Content-Type: multipart/mixed; boundary=q\r\n\r\n" + b"--q\r\n\r\n" * 200
            + b"--q\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64_lines(b"a" * 900))
    assert measured(data, 64) == len(data)


def test_the_raw_limit():
    assert max_message_size.raw_limit({"kb": 100, "base64_allowance": False}) == 102400
    assert max_message_size.raw_limit({"kb": 100, "base64_allowance": True}) == 140288
    assert max_message_size.raw_limit({"kb": 512000, "base64_allowance": True}) == int(
        512000 * 1024 * 1.37)


# --- against a server --------------------------------------------------------------------------


@pytest.mark.parametrize("disabled", [(), ("max_message_size",)])
@pytest.mark.parametrize("allowance,advertised", [(True, "SIZE 140288"),
                                                  (False, "SIZE 102400")])
def test_ehlo_advertises_the_limit(ingress_server, disabled, allowance, advertised):
    server = ingress_server(config(100, allowance), disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        code, text = raw.cmd("EHLO client.example.org")
    sizes = [line for line in text.split("\n") if line.upper().startswith("SIZE")]
    assert code == 250
    assert sizes == ([] if disabled else [advertised])  # the core knows no limit to offer


@pytest.mark.parametrize("disabled", [(), ("max_message_size",)])
def test_mail_size_over_the_limit(ingress_server, disabled):
    server = ingress_server(config(100, False), disabled=disabled)
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        assert raw.cmd("MAIL FROM:<a@example.org> SIZE=102400")[0] == 250
        assert raw.cmd("RSET")[0] == 250
        reply = raw.cmd("MAIL FROM:<a@example.org> SIZE=102401")
        if disabled:
            assert reply[0] == 250
        else:
            assert reply == (552, "5.3.4 Message size exceeds fixed limit")
        raw.cmd("RSET")
        assert raw.cmd("MAIL FROM:<a@example.org> SIZE=12k")[0] == 501  # the core's check


@pytest.mark.parametrize("disabled", [(), ("max_message_size",)])
def test_oversized_data_is_discarded_and_the_session_goes_on(ingress_server, disabled):
    server = ingress_server(config(64, False), disabled=disabled)
    big = text_message(3 * MB)
    with server.smtp() as client:
        client.ehlo("client.example.org")
        code, text = send(client, big)
        if disabled:
            assert code == 250
        else:
            assert (code, text) == (552, b"5.3.4 Message size exceeds fixed limit")
        assert send(client, text_message(10_000))[0] == 250
        assert client.noop()[0] == 250
    stored = server.mailbox(RCPT)
    assert len(stored) == (2 if disabled else 1)
    assert not list((server.queue / "spool").iterdir()), "nothing of it may stay on disk"


@pytest.mark.parametrize("disabled", [(), ("max_message_size",)])
def test_measured_over_the_limit_is_refused(ingress_server, disabled):
    # 80 KB of text: under n (87,654 with the allowance) but measured over 64 KB.
    server = ingress_server(config(64), disabled=disabled)
    with server.smtp() as client:
        client.ehlo("client.example.org")
        code, text = send(client, text_message(80_000))
    if disabled:
        assert code == 250
    else:
        assert (code, text) == (552, b"5.3.4 Message size exceeds fixed limit")


@pytest.mark.parametrize("allowance", [True, False])
def test_base64_allowance_on_a_small_limit(ingress_server, allowance):
    # 60 KB decoded, about 81 KB encoded: over kb*1024 raw, under it decoded.
    server = ingress_server(config(64, allowance))
    data = attachment_message(bytes(range(256)) * 240)
    assert 64 * 1024 < len(data) < 87_654
    with server.smtp() as client:
        client.ehlo("client.example.org")
        assert send(client, data)[0] == (250 if allowance else 552)


def test_50mb_base64_attachment_is_accepted_under_a_limit_its_raw_size_exceeds(ingress_server):
    server = ingress_server(config(40_000))  # 40,960,000 bytes; n = 56,115,200
    payload = bytes(range(256)) * (37 * MB // 256)
    data = attachment_message(payload)
    assert 40_000 * 1024 < len(data) < 56_115_200 and len(data) > 50 * MB
    with server.smtp(timeout=120) as client:
        client.ehlo("client.example.org")
        assert send(client, data)[0] == 250
    [stored] = server.mailbox(RCPT)
    parsed = email.message_from_bytes(stored)
    assert parsed.get_payload()[1].get_payload(decode=True) == payload


def test_the_same_size_of_plain_text_is_refused(ingress_server):
    server = ingress_server(config(40_000))
    data = text_message(len(attachment_message(b"\0" * (37 * MB))))
    with server.smtp(timeout=120) as client:
        client.ehlo("client.example.org")
        assert send(client, data) == (552, b"5.3.4 Message size exceeds fixed limit")
        assert send(client, text_message(1000))[0] == 250  # still usable
    assert len(server.mailbox(RCPT)) == 1


# --- bounded memory ----------------------------------------------------------------------------

RSS_BOUND_KB = 64 * 1024


class PeakRSS:
    """The peak resident set size of a process while a block runs (kB): its high-water mark
    is reset first (``clear_refs``), and VmRSS is sampled as well in case the reset fails."""

    def __init__(self, pid: int):
        self.status = Path(f"/proc/{pid}/status")
        self.clear_refs = Path(f"/proc/{pid}/clear_refs")
        self.peak = 0
        self._stop = threading.Event()

    def _field(self, name: str) -> int:
        return int(re.search(rf"^{name}:\s+(\d+) kB", self.status.read_text(), re.M)[1])

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._field("VmRSS"))

    def __enter__(self):
        try:
            self.clear_refs.write_text("5")  # reset VmHWM (Linux >= 4.0)
            self.reset = True
        except OSError:
            self.reset = False
        self.start = self._field("VmRSS")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self.reset:
            self.peak = max(self.peak, self._field("VmHWM"))


def stream_message(raw, head: bytes, line: bytes, size: int) -> tuple[int, str]:
    """DATA of about *size* bytes: *head*, then *line* repeated, sent 1 MB at a time."""
    assert raw.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert raw.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    raw.send(head)
    block = line * (MB // len(line))
    for _ in range(-(-size // len(block))):
        raw.send(block)
    return raw.cmd(b".")


ATTACHMENT_HEAD = (b"From: a@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\r\n"
                   b"text\r\n--b1\r\nContent-Transfer-Encoding: base64\r\n\r\n")


@pytest.mark.heavy
def test_a_200mb_message_is_received_in_bounded_memory(ingress_server):
    # kb such that 200 MB raw is over kb*1024 but under n: the base64 part is measured too.
    server = ingress_server(config(160_000))
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        time.sleep(0.5)  # let the process settle after start-up
        with PeakRSS(server.pid) as rss:
            code, _ = stream_message(raw, ATTACHMENT_HEAD, b"QUJD" * 19 + b"\r\n", 200 * MB)
        raw.cmd("QUIT")
    print(f"peak RSS receiving 200 MB: {rss.peak} kB (at start {rss.start} kB)")
    assert code == 250
    [path] = server.all_messages()
    assert path.stat().st_size > 200 * MB
    assert rss.peak < RSS_BOUND_KB, f"peak RSS {rss.peak} kB"


@pytest.mark.heavy
def test_a_200mb_oversized_message_is_discarded_in_bounded_memory(ingress_server):
    server = ingress_server(config(1_000, False))
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        time.sleep(0.5)
        with PeakRSS(server.pid) as rss:
            reply = stream_message(raw, b"Subject: big\r\n\r\n", b"y" * 998 + b"\r\n", 200 * MB)
        assert reply == (552, "5.3.4 Message size exceeds fixed limit")
        assert raw.cmd("NOOP")[0] == 250
    print(f"peak RSS discarding 200 MB: {rss.peak} kB (at start {rss.start} kB)")
    assert server.all_messages() == []
    assert rss.peak < RSS_BOUND_KB, f"peak RSS {rss.peak} kB"


# --- measuring never holds up other sessions ---------------------------------------------------


def mime_bomb(size: int) -> bytes:
    """64 nested multiparts, each with a base64 part, the innermost part full of lines that
    look like delimiters of the outer ones: the old walk spent some 13 s of CPU on 20 MB."""
    part = b"Content-Transfer-Encoding: base64\r\n\r\n" + b"QUJD\r\n" * 10
    data = b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for depth in range(63):
        data += (b"--b%d\r\n%s--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n"
                 % (depth, part, depth, depth + 1))
    data += b"--b63\r\n" + part
    return data + b"--b1x\r\n" * ((size - len(data)) // 7)


class PausedMeasurement:
    """Holds every measurement at its *at*-th chunk until released (or *patience* s passed)."""

    def __init__(self, monkeypatch, at: int = 1, patience: float = 20):
        self.paused = threading.Semaphore(0)
        self.release = threading.Event()
        self.timed_out = False
        original = Base64Measure.feed

        def feed(counter, data):
            counter.chunks_seen = getattr(counter, "chunks_seen", 0) + 1
            if counter.chunks_seen == at:
                self.paused.release()
                if not self.release.wait(patience):
                    self.timed_out = True
            original(counter, data)

        monkeypatch.setattr(Base64Measure, "feed", feed)


def send_in_thread(server, data: bytes, results: list) -> threading.Thread:
    def run():
        with server.smtp(timeout=120) as client:
            client.ehlo("bomb.example.org")
            results.append(send(client, data))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_other_sessions_are_served_while_a_message_is_measured(ingress_inprocess_server,
                                                               monkeypatch):
    # A message kept in memory (under 1 MB): the old code measured it on the event loop.
    pause = PausedMeasurement(monkeypatch)
    server = ingress_inprocess_server(config(64))
    results: list = []
    sender = send_in_thread(server, attachment_message(bytes(range(256)) * 240), results)
    assert pause.paused.acquire(timeout=30), "the message was never measured"
    with server.smtp(timeout=60) as other:  # a whole transaction during the measurement
        other.ehlo("other.example.org")
        assert send(other, text_message(2000))[0] == 250
    assert not pause.timed_out and not pause.release.is_set(), "served only after the pause"
    pause.release.set()
    sender.join(60)
    assert results and results[0][0] == 250
    assert len(server.mailbox(RCPT)) == 2


@pytest.mark.heavy
def test_deliveries_go_on_while_mime_bombs_are_measured(ingress_inprocess_server, monkeypatch):
    # As many 20 MB bombs as asyncio's default pool has threads (where deliveries run), each
    # held once its measurement has begun: another client still gets its message stored.
    bombs = min(32, (os.cpu_count() or 1) + 4)
    pause = PausedMeasurement(monkeypatch, at=2)
    server = ingress_inprocess_server(config(15_000))  # 20 MB: over kb*1024, under n
    bomb = mime_bomb(20 * MB)
    assert 15_000 * 1024 < len(bomb) < max_message_size.raw_limit(
        {"kb": 15_000, "base64_allowance": True})
    results: list = []
    senders = [send_in_thread(server, bomb, results) for _ in range(bombs)]
    assert pause.paused.acquire(timeout=120), "no bomb was measured"
    eventually(lambda: len(list((server.queue / "spool").iterdir())) == bombs, 120,
               "every bomb spooled")
    with server.smtp(timeout=120) as other:
        other.ehlo("other.example.org")
        assert send(other, text_message(2000))[0] == 250
    assert not pause.timed_out and not pause.release.is_set(), "served only after the pause"
    pause.release.set()
    for sender in senders:
        sender.join(120)
    expected = 552 if measured(bomb, 1 << 16) > 15_000 * 1024 else 250
    assert [code for code, _ in results] == [expected] * bombs
