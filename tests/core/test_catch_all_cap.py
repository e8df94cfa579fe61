"""catch_all_max_mailboxes: a catch-all domain gets at most that many mailbox folders; a RCPT
that would make one more gets 452 4.3.1, existing mailboxes keep receiving."""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path

import pytest

from ingress.delivery.maildir import MailboxCap
from ingress.directory import Directory, DirectoryError
from ingress.testing import eventually

FULL = (452, "4.3.1 Too many mailboxes")


def config(cap: int, tmp_path: Path | None = None, **server) -> dict:
    cfg = {"directory": {
        "domains": ["catch.test"],
        "users": [{"address": "boss@catch.test", "password": "x"}],
        "domain_settings": {"catch.test": {"catch_all": True, "catch_all_max_mailboxes": cap}}}}
    if tmp_path is not None:
        cfg["delivery"] = {"maildir": str(tmp_path / "mail"), "queue": str(tmp_path / "queue")}
    if server:
        cfg["server"] = server
    return cfg


def folders(server) -> list[str]:
    domain = server.maildir / "catch.test"
    return sorted(p.name for p in domain.iterdir()) if domain.is_dir() else []


def rcpt(raw, address: str) -> tuple[int, str]:
    code, text = raw.cmd(f"RCPT TO:<{address}>")
    return code, text.split("\n")[0][:24]


def send(server, recipients: list[str]) -> list[tuple[int, str]]:
    """One transaction; the RCPT replies. DATA when any recipient was accepted."""
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        assert raw.cmd("MAIL FROM:<s@example.org>")[0] == 250
        replies = [rcpt(raw, r) for r in recipients]
        if any(code == 250 for code, _ in replies):
            assert raw.cmd("DATA")[0] == 354
            assert raw.cmd("Subject: x\r\n\r\nbody\r\n.")[0] == 250
        raw.cmd("QUIT")
    return replies


def test_the_cap_holds_and_existing_mailboxes_keep_working(ingress_server):
    server = ingress_server(config(3))
    replies = send(server, ["a@catch.test", "B@catch.test", "a@catch.test", "c@catch.test",
                            "d@catch.test"])
    assert [code for code, _ in replies] == [250, 250, 250, 250, 452]
    assert replies[-1] == FULL
    assert folders(server) == ["a", "b", "c"]
    # later sessions: old names still work, new ones do not, a configured user always does
    assert send(server, ["e@catch.test"]) == [FULL]
    assert [c for c, _ in send(server, ["c@catch.test", "A@catch.test", "boss@catch.test",
                                        "f@catch.test"])] == [250, 250, 250, 452]
    assert folders(server) == ["a", "b", "boss", "c"]
    assert len(server.mailbox("a@catch.test")) == 2  # named twice in one transaction: one copy
    # removing a folder frees a place
    import shutil
    shutil.rmtree(server.maildir / "catch.test" / "b")
    shutil.rmtree(server.maildir / "catch.test" / "boss")
    assert [c for c, _ in send(server, ["g@catch.test", "h@catch.test"])] == [250, 452]


def test_what_is_on_disk_counts_across_restarts(ingress_server, tmp_path):
    box = tmp_path / "mail" / "catch.test"
    for i in range(5):  # a domain already over a cap set later
        for sub in ("tmp", "new", "cur"):
            (box / f"old{i}" / sub).mkdir(parents=True)
    first = ingress_server(config(6, tmp_path), name="first")
    assert [c for c, _ in send(first, ["new1@catch.test", "new2@catch.test"])] == [250, 452]
    assert first.stop() == 0
    second = ingress_server(config(4, tmp_path), name="second")
    assert send(second, ["new3@catch.test"]) == [FULL]
    assert [c for c, _ in send(second, ["old0@catch.test", "new1@catch.test"])] == [250, 250]
    assert len(list(box.iterdir())) == 6


def test_concurrent_sessions_cannot_all_take_the_last_places(ingress_server):
    server = ingress_server(config(4))
    clients = [server.raw() for _ in range(10)]
    try:
        for raw in clients:
            raw.reply()
            raw.cmd("EHLO client.example.org")
            assert raw.cmd("MAIL FROM:<s@example.org>")[0] == 250
        codes = [rcpt(raw, f"n{i}@catch.test")[0] for i, raw in enumerate(clients)]
        assert codes == [250] * 4 + [452] * 6
        # an abandoned transaction gives its place back; a delivered one keeps it on disk
        clients[0].cmd("RSET")
        for raw in clients[1:4]:
            assert raw.cmd("DATA")[0] == 354
            assert raw.cmd("Subject: x\r\n\r\nbody\r\n.")[0] == 250
        assert rcpt(clients[4], "late@catch.test")[0] == 250
        assert rcpt(clients[5], "later@catch.test") == FULL
    finally:
        for raw in clients:
            raw.close()
    assert folders(server) == ["n1", "n2", "n3"]


def test_several_workers_count_the_same_folders(ingress_server):
    server = ingress_server(config(5, workers=2))
    for i in range(5):
        assert send(server, [f"w{i}@catch.test"])[0][0] == 250
    refused = [send(server, [f"x{i}@catch.test"])[0] for i in range(12)]
    assert refused == [FULL] * 12
    assert len(folders(server)) == 5


@pytest.mark.parametrize("value", [0, -1, "many", True, 2.5])
def test_bad_values_are_config_errors(value):
    section = {"domains": ["catch.test"],
               "domain_settings": {"catch.test": {"catch_all_max_mailboxes": value}}}
    with pytest.raises(DirectoryError) as info:
        Directory.from_config(section, Path("/x"))
    assert [p for p, _ in info.value.errors] == [
        "/directory/domain_settings/catch.test/catch_all_max_mailboxes"]


def test_default_is_1000():
    directory = Directory.from_config(
        {"domains": ["catch.test"], "domain_settings": {"catch.test": {"catch_all": True}}},
        Path("/x"))
    assert directory.domain_settings("catch.test").catch_all_max_mailboxes == 1000


def test_the_folder_is_listed_again_only_when_it_changed(tmp_path):
    counter, folder = MailboxCap(), tmp_path / "catch.test"
    assert counter.on_disk(folder) == 0
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
    (folder / "stray-file").write_text("")
    old = time.time() - 60
    os.utime(folder, (old, old))
    assert counter.on_disk(folder) == 2
    # A change that kept the folder's time (as two changes in one clock tick may) is not seen:
    # the cached count was used, no listing.
    (folder / "c").mkdir()
    os.utime(folder, (old, old))
    assert counter.on_disk(folder) == 2
    os.utime(folder)  # a real change moves the time: listed again, and not cached while fresh
    assert counter.on_disk(folder) == 3
    (folder / "d").mkdir()
    os.utime(folder, ns=(os.stat(folder).st_atime_ns, os.stat(folder).st_mtime_ns))
    assert counter.on_disk(folder) == 4


class Holder:
    """Stands for a transaction: a name is held while it lives."""


def test_a_delivered_name_still_held_counts_once(tmp_path):
    # The 250 after DATA goes out while the session's transaction (which holds the name) may
    # live on a moment: its folder on disk and its hold must not both count.
    counter, folder = MailboxCap(), tmp_path / "catch.test"
    first, second = Holder(), Holder()
    assert counter.admit(folder, "one", 2, first)
    (folder / "one").mkdir(parents=True)  # delivered; `first` still alive
    assert counter.admit(folder, "two", 2, second)
    assert not counter.admit(folder, "three", 2, Holder())
    del second  # an abandoned transaction gives its place back
    assert counter.admit(folder, "three", 2, first)


def test_rcpts_to_new_names_stop_at_the_cap_with_smtplib(ingress_server):
    server = ingress_server(config(2))
    with server.smtp() as client:
        client.ehlo()
        client.mail("s@example.org")
        assert client.rcpt("one@catch.test")[0] == 250
        assert client.rcpt("two@catch.test")[0] == 250
        code, text = client.rcpt("three@catch.test")
        assert (code, text) == (452, b"4.3.1 Too many mailboxes")
        client.data("Subject: x\r\n\r\nbody\r\n")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        with server.smtp() as client:
            client.sendmail("s@example.org", ["four@catch.test"], "Subject: y\r\n\r\nz\r\n")


def test_a_success_dsn_makes_no_mailbox_over_the_cap(ingress_server):
    server = ingress_server(config(1))
    assert send(server, ["a@catch.test"])[0][0] == 250
    with server.raw() as raw:
        raw.reply()
        raw.cmd("EHLO client.example.org")
        assert raw.cmd("MAIL FROM:<forged@catch.test> RET=FULL")[0] == 250
        assert raw.cmd("RCPT TO:<a@catch.test> NOTIFY=SUCCESS")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        assert raw.cmd("Subject: x\r\n\r\nbody\r\n.")[0] == 250
        raw.cmd("QUIT")
    eventually(lambda: "over the catch-all limit" in server.log(), what="the log line")
    assert folders(server) == ["a"]
