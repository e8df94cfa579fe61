"""The test kit itself (``ingress.testing``): what plugin authors rely on must work."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import textwrap
import threading

import psutil
import pytest

from ingress import Reply, hookimpl
from ingress.errors import ConfigError, IngressError
from ingress.session import Recipient, Session
from ingress.spool import Message
from ingress.testing import SMTPRaw

pytest_plugins = ["pytester"]

LOCAL = {"directory": {"domains": ["example.test"],
                       "users": [{"address": "alice@example.test", "password": "pw"}]}}
MESSAGE = "From: s@example.org\r\nTo: alice@example.test\r\nSubject: kit\r\n\r\nHello.\r\n"


class Recorder:
    """A plugin object that is installed nowhere: it records what it saw and refuses a word."""

    def __init__(self):
        self.helos: list[tuple[str, dict]] = []

    @hookimpl
    def config_schema(self):
        return {"type": "object", "additionalProperties": False,
                "properties": {"refuse": {"type": "string", "default": "bad.example"}}}

    @hookimpl
    def on_helo(self, hostname, settings):
        self.helos.append((hostname, settings))
        if hostname == settings["refuse"]:
            logging.getLogger("recorder").warning("refused %s", hostname)
            return Reply(550, "5.7.1", "Not that name")
        return None


def refused(host, port) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# --- ingress_server: a subprocess ---------------------------------------------------------------


def test_subprocess_server_delivers_to_its_own_maildir(ingress_server, tmp_path):
    server = ingress_server({**LOCAL, "plugins": {"relay": {"whitelist": ["127.0.0.1"]}}})
    assert server.host == "127.0.0.1" and server.port > 0
    assert server.maildir.is_relative_to(tmp_path) and server.queue.is_relative_to(tmp_path)
    assert psutil.Process(server.pid).is_running()
    with server.smtp() as client:
        client.sendmail("s@example.org", ["alice@example.test"], MESSAGE)
        client.sendmail("s@example.org", ["carol@elsewhere.test"], MESSAGE)
    [stored] = server.mailbox("alice@example.test")
    assert b"Subject: kit" in stored
    assert server.all_messages()[0].read_bytes() == stored
    [(envelope, queued)] = server.queue_entries()
    assert "carol@elsewhere.test" in json.dumps(envelope)
    assert b"Subject: kit" in queued
    assert "ingress" in server.log()
    assert server.stop() == 0


def test_subprocess_server_options(ingress_server):
    banner = {"plugins": {"banner": {"text": "kit test"}}}
    plain = ingress_server(banner, disabled=("banner",), name="plain")
    custom = ingress_server(banner, env={"INGRESS_TRACE_PLUGINS": "1"}, name="custom")
    assert plain.config_path.parent != custom.config_path.parent
    with plain.raw() as a, custom.raw() as b:
        assert a.reply() == (220, "mx.test ESMTP")
        assert b.reply() == (220, "kit test")
    assert "hook greeting -> banner" in custom.log()


def test_subprocess_server_imports_what_the_test_can_import(ingress_server, tmp_path,
                                                            monkeypatch):
    # As in the README: a plugin module beside its tests, named in server.plugin_modules.
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "kit_beside_tests.py").write_text(textwrap.dedent("""
        from ingress import Reply, hookimpl

        @hookimpl
        def on_mail_from(transaction):
            return Reply(550, "5.7.1", "Sender refused by kit_beside_tests")
    """))
    monkeypatch.syspath_prepend(folder)
    server = ingress_server({"server": {"plugin_modules": ["kit_beside_tests"]},
                             "plugins": {"kit_beside_tests": {}}})
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("s@example.org") == (550, b"5.7.1 Sender refused by kit_beside_tests")


def test_subprocess_server_that_cannot_start_says_why(ingress_server):
    with pytest.raises(RuntimeError, match="/server/bogus: unknown key"):
        ingress_server({"server": {"bogus": 1}})


# --- ingress_inprocess_server: a thread of the test process -----------------------------------


def test_inprocess_server_runs_a_plugin_object_installed_nowhere(ingress_inprocess_server,
                                                                 caplog):
    plugin = Recorder()
    server = ingress_inprocess_server({**LOCAL, "plugins": {"recorder": {}}},
                                      plugins={"recorder": plugin})
    with server.smtp() as client:
        assert client.ehlo("bad.example")[0] == 550
        assert client.ehlo("good.example")[0] == 250
        client.sendmail("s@example.org", ["alice@example.test"], MESSAGE)
    assert plugin.helos == [("bad.example", {"refuse": "bad.example"}),
                            ("good.example", {"refuse": "bad.example"})]
    assert len(server.mailbox("alice@example.test")) == 1
    assert ("recorder", logging.WARNING, "refused bad.example") in caplog.record_tuples


def test_inprocess_plugin_settings_come_from_its_section(ingress_inprocess_server):
    plugin = Recorder()
    server = ingress_inprocess_server({"plugins": {"recorder": {"refuse": "other.example"}}},
                                      plugins={"recorder": plugin})
    with server.raw() as client:
        client.reply()
        assert client.cmd("EHLO bad.example")[0] == 250
        assert client.cmd("EHLO other.example") == (550, "5.7.1 Not that name")


def test_inprocess_object_replaces_an_installed_plugin_of_that_name(ingress_inprocess_server,
                                                                    tmp_path, monkeypatch):
    # A distribution on sys.path whose entry point refuses every HELO.
    site = tmp_path / "site"
    (site / "kit_dist-1.0.dist-info").mkdir(parents=True)
    (site / "kit_dist-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kit-dist\nVersion: 1.0\n")
    (site / "kit_dist-1.0.dist-info" / "entry_points.txt").write_text(
        "[ingress.plugins]\nrecorder = kit_installed\n")
    (site / "kit_installed.py").write_text(
        "from ingress import Reply, hookimpl\n\n"
        "@hookimpl\ndef on_helo():\n    return Reply(550, '5.7.1', 'installed copy')\n")
    monkeypatch.syspath_prepend(site)

    installed = ingress_inprocess_server({"plugins": {"recorder": {}}}, name="installed")
    with installed.smtp() as client:
        assert client.ehlo("x.example") == (550, b"5.7.1 installed copy")

    plugin = Recorder()
    given = ingress_inprocess_server({"plugins": {"recorder": {}}}, plugins={"recorder": plugin},
                                     name="given")
    with given.smtp() as client:
        assert client.ehlo("x.example")[0] == 250
    assert plugin.helos == [("x.example", {"refuse": "bad.example"})]


def test_inprocess_config_error_and_busy_port_leave_no_thread(ingress_inprocess_server):
    before = threading.active_count()
    with pytest.raises(ConfigError) as info:
        ingress_inprocess_server({"plugins": {"recorder": {"refus": "x"}}},
                                 plugins={"recorder": Recorder()})
    assert "/plugins/recorder/refus: unknown key 'refus'" in str(info.value)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(IngressError, match="cannot listen"):
            ingress_inprocess_server({"server": {"listen": [f"127.0.0.1:{port}"]}})
    assert threading.active_count() == before


# --- SMTPRaw --------------------------------------------------------------------------------------


def test_raw_client_reads_multiline_replies_and_sees_the_close(ingress_inprocess_server):
    server = ingress_inprocess_server()
    with SMTPRaw(server.host, server.port) as client:
        assert client.reply()[0] == 220
        code, text = client.cmd(b"EHLO client.example")
        assert code == 250
        lines = text.split("\n")
        assert lines[0].startswith("mx.test Hello client.example") and "PIPELINING" in lines
        client.send("NOOP\r\nNOOP\r\n")  # pipelined: two replies, read one by one
        assert client.reply() == client.reply() == (250, "2.0.0 OK")
        assert client.cmd("QUIT")[0] == 221
        assert client.closed_by_server()


# --- teardown: every server is stopped after its test ---------------------------------------------


def test_servers_are_stopped_after_the_test(pytester):
    record = pytester.path / "started.json"
    pytester.makepyfile(textwrap.dedent(f"""
        import json, pathlib

        def test_start(ingress_server, ingress_inprocess_server):
            sub = ingress_server()
            inproc = ingress_inprocess_server()
            out = {{"pid": sub.pid, "ports": [sub.port, inproc.port],
                   "thread": inproc._thread.ident}}
            pathlib.Path({str(record)!r}).write_text(json.dumps(out))
    """))
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    started = json.loads(record.read_text())
    assert not psutil.pid_exists(started["pid"]) or (
        psutil.Process(started["pid"]).status() == psutil.STATUS_ZOMBIE)
    assert all(refused("127.0.0.1", port) for port in started["ports"])
    assert started["thread"] not in {t.ident for t in threading.enumerate()}


# --- ingress_plugin: one hook of one plugin, no server -------------------------------------------


class Kit:
    """A plugin object with one hook of each kind the harness must handle."""

    @hookimpl
    def config_schema(self):
        return {"type": "object", "additionalProperties": False, "properties": {
            "limit": {"type": "integer", "minimum": 1, "default": 2},
            "lists": {"type": "object", "default": {},
                      "additionalProperties": {"type": "object", "properties": {
                          "size": {"type": "integer", "default": 5}}}}}}

    @hookimpl
    def on_connect(self, session, settings):
        if session.count_concurrent(f"kit {session.peer_ip}") > settings["limit"]:
            return Reply(421, "4.7.0", "Too many", close=True)
        return None

    @hookimpl
    async def on_rcpt(self, session, transaction, recipient):
        await asyncio.sleep(0)
        if not recipient.local:
            return Reply(550, "5.7.1", f"{recipient.address} is not local to {session.hostname}")
        return None

    @hookimpl
    def on_data(self, transaction, message, settings):
        async def later():
            return Reply(554, "5.4.6", "Too many hops") if message.header_count(
                "Received") > settings["limit"] else None
        transaction.add_header("X-Kit", str(message.size))
        return later() if message.size else None

    @hookimpl
    async def greeting(self, settings):
        await asyncio.sleep(settings["limit"])
        return "never"

    @hookimpl
    def on_vrfy(self, address):
        raise RuntimeError(f"broken for {address}")


def test_harness_settings_are_validated_and_defaulted_like_a_servers(ingress_plugin, tmp_path):
    from ingress import config as config_mod

    section = {"lists": {"a": {}, "b": {"size": 7}}}
    plugin = ingress_plugin(Kit(), section, name="kit")
    built = config_mod.build({"plugins": {"kit": section}}, None, tmp_path,
                             extra_plugins={"kit": Kit()})
    assert plugin.settings == built.plugin_settings("kit")
    assert plugin.settings == {"limit": 2, "lists": {"a": {"size": 5}, "b": {"size": 7}}}
    assert section == {"lists": {"a": {}, "b": {"size": 7}}}  # the caller's dict is left alone
    with pytest.raises(ConfigError, match=r"kit \(test config\): /plugins/kit/limit: 0 is less"):
        ingress_plugin(Kit(), {"limit": 0}, name="kit")
    with pytest.raises(ConfigError, match="/plugins/kit/limt: unknown key 'limt'"):
        ingress_plugin(Kit(), {"limt": 3}, name="kit")
    with pytest.raises(ConfigError, match="/server/hostnam: unknown key"):
        ingress_plugin(Kit(), name="kit", config={"server": {"hostnam": "x"}})
    with pytest.raises(ValueError, match="give the plugin's name"):
        ingress_plugin(Kit())


def test_harness_calls_a_plain_hook_with_the_core_objects(ingress_plugin):
    plugin = ingress_plugin(Recorder(), {"refuse": "bad.example"}, name="recorder")
    assert plugin.call("on_helo", verb="EHLO", hostname="bad.example") == Reply(
        550, "5.7.1", "Not that name")
    assert plugin.call("on_helo", hostname="good.example") is None
    assert plugin.plugin.helos == [("bad.example", {"refuse": "bad.example"}),
                                   ("good.example", {"refuse": "bad.example"})]
    session = plugin.session(peer=("198.51.100.7", 4000), helo="c.example", auth_user="a@x")
    assert isinstance(session, Session) and session.config is plugin.config
    assert (session.peer_ip, session.hostname, session.protocol) == ("198.51.100.7", "mx.test",
                                                                     "ESMTPA")


def test_harness_counts_concurrent_connections(ingress_plugin):
    plugin = ingress_plugin(Kit(), name="kit")
    session = plugin.session(peer=("192.0.2.9", 1))
    assert plugin.call("on_connect", session=session) is None  # 1 of 2
    plugin.concurrent["kit 192.0.2.9"] = 5  # five other connections from that address
    assert plugin.call("on_connect", session=session) == Reply(421, "4.7.0", "Too many",
                                                               close=True)


def test_harness_awaits_async_hooks_and_awaitable_results(ingress_plugin):
    plugin = ingress_plugin(Kit(), {"limit": 1}, name="kit",
                            config={"directory": {"domains": ["example.test", "other.test"]}})
    session = plugin.session()
    transaction = plugin.transaction("s@example.org", {"BODY": "8BITMIME"}, ["a@other.test"],
                                     session=session)
    assert session.transaction is transaction and transaction.recipients[0].local
    far = plugin.recipient("b@elsewhere.test")
    assert isinstance(far, Recipient) and not far.local
    assert plugin.call("on_rcpt", session=session, transaction=transaction, recipient=far) == (
        Reply(550, "5.7.1", "b@elsewhere.test is not local to mx.test"))
    hops = plugin.message("Received: a\nReceived: b\r\nSubject: x\n\nbody")
    assert isinstance(hops, Message) and hops.getvalue() == (
        b"Received: a\r\nReceived: b\r\nSubject: x\r\n\r\nbody\r\n")
    assert plugin.call("on_data", transaction=transaction, message=hops).code == 554
    assert transaction.added_headers == [("X-Kit", str(hops.size))]

    async def in_a_loop():
        assert await plugin.acall("on_rcpt", transaction=transaction, recipient=far)
        assert await plugin.acall("on_data", transaction=transaction,
                                  message=plugin.message(b"Subject: y\r\n\r\n")) is None
        with pytest.raises(RuntimeError, match=r"await harness\.acall"):
            plugin.call("on_rcpt", transaction=transaction, recipient=far)

    asyncio.run(in_a_loop())


def test_harness_bounds_waiting_hooks_and_lets_errors_through(ingress_plugin):
    plugin = ingress_plugin(Kit(), {"limit": 3600}, name="kit",
                            config={"server": {"hook_timeout": 0.05}})
    with pytest.raises(asyncio.TimeoutError):  # TimeoutError from Python 3.11 on
        plugin.call("greeting")
    with pytest.raises(RuntimeError, match="broken for x@example.test"):
        plugin.call("on_vrfy", address="x@example.test")


def test_harness_refuses_wrong_calls(ingress_plugin):
    plugin = ingress_plugin(Kit(), name="kit")
    with pytest.raises(ValueError, match="no hook named 'on_hello'"):
        plugin.call("on_hello")
    with pytest.raises(ValueError, match="'kit' does not implement on_helo"):
        plugin.call("on_helo", hostname="x")
    with pytest.raises(TypeError, match="on_rcpt takes session, transaction, recipient, not rcpt"):
        plugin.call("on_rcpt", rcpt="x")
    with pytest.raises(TypeError, match="kit's on_rcpt needs transaction, recipient"):
        plugin.call("on_rcpt")


def test_harness_messages_spill_like_the_cores_and_are_removed(ingress_plugin, tmp_path):
    plugin = ingress_plugin(Kit(), name="kit")
    big = plugin.message(b"Subject: big\r\n\r\n" + b"x" * (2 << 20))
    assert not big.in_memory and list((tmp_path / "spool").iterdir())
    assert big.headers() == [("Subject", "big")]
    cut = plugin.message(b"Subject: cut\r\n\r\n" + b"y" * 100, data_limit=50)
    assert cut.oversized and cut.size == 118
    plugin.close()
    assert not list((tmp_path / "spool").iterdir())
