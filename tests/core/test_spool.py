"""The spool's Message: bounded memory, oversized data not kept, tolerant header parsing."""

from __future__ import annotations

from ingress import spool
from ingress.spool import Message


def message(tmp_path, data: bytes, limit: int | None = None) -> Message:
    m = Message(tmp_path / "spool", limit)
    for i in range(0, len(data), 1000):
        m.write(data[i:i + 1000])
    return m


def test_small_messages_stay_in_memory_big_ones_spill_to_the_spool(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "MEMORY_LIMIT", 10_000)
    small, big = message(tmp_path, b"a" * 5000), message(tmp_path, b"b" * 50_000)
    try:
        assert small.in_memory and not big.in_memory
        assert len(list((tmp_path / "spool").iterdir())) == 1
        assert b"".join(big.chunks(4096)) == b"b" * 50_000
        with big.open() as f:
            assert f.read() == b"b" * 50_000
    finally:
        small.close()
        big.close()
    assert list((tmp_path / "spool").iterdir()) == []


def test_past_the_data_limit_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "MEMORY_LIMIT", 10_000)
    m = message(tmp_path, b"c" * 200_000, limit=30_000)
    try:
        assert m.oversized and m.size == 200_000
        assert m.in_memory and m.getvalue() == b""
        assert not (tmp_path / "spool").exists() or list((tmp_path / "spool").iterdir()) == []
    finally:
        m.close()


def test_headers_are_unfolded_in_order(tmp_path):
    m = message(tmp_path, b"Received: from a\r\n\tby b;\r\n date\r\nSubject: s\r\n\r\n"
                          b"Received: in the body\r\n")
    assert m.headers() == [("Received", "from a by b; date"), ("Subject", "s")]
    assert m.header_count("received") == 1


def test_headers_tolerate_malformed_and_8bit_lines(tmp_path):
    data = (b" leading continuation\r\n"
            b"From sender@example.org Mon Jan  1 00:00:00 2024\r\n"  # mbox line
            b"Received: from x\r\n"
            b"not a header line\r\n"
            b"Received : obsolete syntax, space before the colon\r\n"
            b"Bad Name: skipped\r\n"
            b": no name\r\n"
            b"Subject: caf\xe9 \xff\r\n"
            b"RECEIVED:no space\r\n"
            b"\r\nbody\r\n")
    m = message(tmp_path, data)
    names = [n for n, _ in m.headers()]
    assert names == ["Received", "Received", "Subject", "RECEIVED"]
    assert m.header_count("Received") == 3
    assert m.headers()[2][1].encode("utf-8", "surrogateescape") == b"caf\xe9 \xff"


def test_headers_of_a_message_without_header_or_body(tmp_path):
    assert message(tmp_path, b"\r\nbody only\r\n").headers() == []
    assert message(tmp_path, b"").headers() == []
    assert message(tmp_path, b"Subject: no body and no end").headers() == [
        ("Subject", "no body and no end")]


# --- a full disk --------------------------------------------------------------------------------

MB = 1 << 20
LOCAL = {"directory": {"domains": ["example.test"],
                       "users": [{"address": "alice@example.test", "password": "x"}]}}


def text(size: int) -> bytes:
    return b"Subject: t\r\n\r\n" + (b"y" * 98 + b"\r\n") * (size // 100)


def transaction(client, data: bytes) -> tuple[int, bytes]:
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt("alice@example.test")[0] == 250
    return client.data(data)


def test_the_spool_filling_up_mid_data_answers_451_and_the_session_goes_on(
        small_filesystem, ingress_server, tmp_path):
    spool_dir = small_filesystem(tmp_path / "server" / "queue" / "spool", 2048)
    server = ingress_server(LOCAL)
    with server.smtp(timeout=60) as client:
        client.ehlo("client.example.org")
        # 4 MB: spilled to the spool past 1 MB, which is full at 2 MB; read to the final dot
        assert transaction(client, text(4 * MB)) == (
            451, b"4.3.0 Local storage error, try again later")
        assert list(spool_dir.iterdir()) == [], "nothing half-written stays"
        # the space is back: a spilled message that fits, and one kept in memory
        assert transaction(client, text(MB + MB // 2))[0] == 250
        assert transaction(client, text(10_000))[0] == 250
        assert client.noop()[0] == 250
    assert len(server.mailbox("alice@example.test")) == 2
    assert list(spool_dir.iterdir()) == []
    log = server.log()
    assert "Traceback" not in log and "Internal error" not in log
    assert log.count("spooling the message failed: [Errno 28] No space left on device") == 1


def test_a_full_maildir_answers_451_and_keeps_nothing_half_written(
        small_filesystem, ingress_server, tmp_path):
    mail = small_filesystem(tmp_path / "server" / "mail", 1024)
    server = ingress_server(LOCAL)
    with server.smtp(timeout=60) as client:
        client.ehlo("client.example.org")
        assert transaction(client, text(10_000))[0] == 250  # makes the mailbox
        assert transaction(client, text(2 * MB)) == (
            451, b"4.3.0 Local storage error, try again later")
        assert transaction(client, text(10_000))[0] == 250
    files = [p for p in mail.rglob("*") if p.is_file()]
    assert len(files) == 2 and all(p.parent.name == "new" for p in files)
    assert "Traceback" not in server.log()
