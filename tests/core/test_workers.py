"""server.workers: processes sharing the listeners, a global connection count, signals, metrics."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingress import workers
from ingress.testing import SMTPRaw, eventually, server_config

USERS = {"directory": {"domains": ["example.test"],
                       "users": [{"address": "alice@example.test", "password": "pw"}]}}
COUNTING = {"server": {"workers": 2, "plugin_modules": ["connection_count"]},
            "plugins": {"connection_count": {"limit": 0}}, **USERS}
CONNECTIONS = 20  # enough that both workers get some: all on one has odds 2 ** -19


def greeting(raw: SMTPRaw) -> tuple[int, int]:
    """(worker pid, connections) from the connection_count plugin's greeting."""
    code, text = raw.reply()
    assert code == 220, text
    found = re.fullmatch(r"pid (\d+) connections (\d+)", text)
    return int(found[1]), int(found[2])


def accepting_pids(server) -> set[str]:
    return set(re.findall(r"ingress\[(\d+)\] INFO ingress\.smtp: accepted", server.log()))


def test_two_workers_serve_and_ready_lines_are_printed_once(tmp_path):
    config = server_config(tmp_path, {"server": {"workers": 2}, **USERS})
    path = tmp_path / "ingress.json"
    path.write_text(json.dumps(config))
    with open(tmp_path / "log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ingress", "serve", "--config", str(path)],
            stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path)
    try:
        line = process.stdout.readline()
        port = int(re.fullmatch(r"ingress: listening on 127\.0\.0\.1:(\d+) \(smtp\)\n", line)[1])
        for i in range(CONNECTIONS):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("s@example.org", ["alice@example.test"],
                                f"Subject: {i}\r\n\r\nx\r\n")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert process.stdout.read() == "", "one ready line, printed once"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    pids = set(re.findall(r"ingress\[(\d+)\] INFO ingress\.smtp: accepted",
                          (tmp_path / "log").read_text()))
    assert len(pids) == 2, "both workers took connections"
    assert str(process.pid) not in pids, "the parent only supervises"
    assert len(list((tmp_path / "mail").glob("example.test/alice/new/*"))) == CONNECTIONS


def test_open_connections_are_counted_across_workers(ingress_server):
    server = ingress_server({**COUNTING, "plugins": {"connection_count": {"limit": CONNECTIONS}}})

    def count_now():
        with server.raw() as probe:
            return greeting(probe)[1]

    held = []
    try:
        seen = []
        for _ in range(CONNECTIONS):
            held.append(server.raw())
            seen.append(greeting(held[-1]))
        assert [count for _, count in seen] == list(range(1, CONNECTIONS + 1)), (
            "each connection sees the open connections of every worker")
        assert len({pid for pid, _ in seen}) == 2, "both workers took connections"
        for _ in range(4):  # over the limit, whichever worker takes it
            with server.raw() as extra:
                assert extra.reply() == (421, "4.3.2 mx.test Too many connections")
                assert extra.closed_by_server()
        for raw in held[:5]:
            raw.cmd("QUIT")
            raw.close()
        del held[:5]
        eventually(lambda: count_now() == CONNECTIONS - 5 + 1, what="closed connections counted")
    finally:
        for raw in held:
            raw.close()
    eventually(lambda: count_now() == 1, what="every connection released")


def test_sigterm_lets_sessions_on_every_worker_finish_then_exits_0(ingress_server):
    server = ingress_server({**COUNTING, "server": {**COUNTING["server"], "drain_seconds": 20}})
    clients, pids = [], set()
    for _ in range(CONNECTIONS):  # a started transaction on each worker
        raw = server.raw()
        pids.add(greeting(raw)[0])
        assert raw.cmd("EHLO c")[0] == 250
        assert raw.cmd("MAIL FROM:<s@example.org>")[0] == 250
        clients.append(raw)
    assert len(pids) == 2
    server.signal(signal.SIGTERM)
    eventually(lambda: server.log().count("shutting down") == 2, what="both workers draining")
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=2).close()
    for i, raw in enumerate(clients):
        assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        assert raw.cmd(f"Subject: late {i}\r\n\r\nx\r\n.")[0] == 250
        assert raw.cmd("QUIT")[0] == 221
        raw.close()
    assert server.process.wait(30) == 0
    assert len(server.mailbox("alice@example.test")) == CONNECTIONS


def test_sigterm_cuts_sessions_after_drain_seconds_and_still_exits_0(ingress_server):
    server = ingress_server({**COUNTING, "server": {**COUNTING["server"], "drain_seconds": 0.5}})
    clients = [server.raw() for _ in range(6)]
    for raw in clients:
        greeting(raw)
    server.signal(signal.SIGTERM)
    for raw in clients:
        assert raw.reply() == (421, "4.3.2 mx.test Service shutting down")
        raw.close()
    assert server.process.wait(30) == 0


def test_sighup_reaches_every_worker(ingress_server):
    server = ingress_server({"server": {"workers": 2}, **USERS,
                             "plugins": {"banner": {"text": "first"}}})
    data = json.loads(server.config_path.read_text())
    data["plugins"] = {"banner": {"text": "second"}}
    server.config_path.write_text(json.dumps(data))
    server.signal(signal.SIGHUP)
    eventually(lambda: len(set(re.findall(r"ingress\[(\d+)\] INFO ingress\.server: reloaded",
                                        server.log()))) == 2, what="both workers reloaded")
    for _ in range(CONNECTIONS):
        with server.raw() as raw:
            assert raw.reply() == (220, "second")
    assert server.process.poll() is None


def test_a_worker_that_dies_is_replaced(ingress_server):
    server = ingress_server(COUNTING)
    with server.raw() as raw:
        victim = greeting(raw)[0]
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: f"(pid {victim}) exited with -9" in server.log(), what="the parent noticed")
    eventually(lambda: len(psutil.Process(server.pid).children()) == 2, what="a new worker")
    pids = set()
    for _ in range(CONNECTIONS):
        with server.raw() as raw:
            pids.add(greeting(raw)[0])
    assert len(pids) == 2 and victim not in pids
    assert server.stop() == 0


def test_workers_stop_when_the_parent_is_gone(ingress_server):
    server = ingress_server(COUNTING)
    workers = psutil.Process(server.pid).children()
    assert len(workers) == 2
    server.process.kill()
    server.process.wait(10)
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert alive == []


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_served_once_for_all_workers(ingress_server):
    server = ingress_server({**COUNTING, "server": {**COUNTING["server"],
                                                   "metrics_listen": "127.0.0.1:0"}})
    assert [kind for _, _, kind in server.listeners] == ["smtp", "metrics"]
    for i in range(CONNECTIONS):
        with server.smtp() as client:
            client.sendmail("s@example.org", ["alice@example.test"], f"Subject: {i}\r\n\r\nx\r\n")
    assert len(accepting_pids(server)) == 2
    held = server.raw()
    try:
        greeting(held)
        metrics = scrape(server.metrics_url)
    finally:
        held.close()
    assert metrics[("ingress_sessions_total", ())] == CONNECTIONS + 1
    assert metrics[("ingress_messages_accepted_total", ())] == CONNECTIONS
    assert metrics[("ingress_domain_messages_total", (("domain", "example.test"),))] == CONNECTIONS
    assert metrics[("ingress_open_connections", ())] == 1


def file_system_type(path: str) -> str:
    mounts = [p for p in psutil.disk_partitions(all=True)
              if path == p.mountpoint or path.startswith(p.mountpoint.rstrip("/") + "/")]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype


@pytest.mark.skipif(workers.metrics_parent_folder() != "/dev/shm",
                    reason="no /dev/shm with room here")
def test_metric_files_live_in_shared_memory_and_go_at_exit(ingress_server):
    # Not beside the Maildir on a disk: each syncfs of the delivery would write them back.
    stale = tempfile.mkdtemp(prefix="ingress-metrics-", dir="/dev/shm")  # a killed server's
    open(os.path.join(stale, ".lock"), "w").close()
    server = ingress_server({**COUNTING, "server": {**COUNTING["server"],
                                                   "metrics_listen": "127.0.0.1:0"}})
    assert not os.path.exists(stale)
    with server.smtp() as client:
        client.sendmail("s@example.org", ["alice@example.test"], "Subject: 1\r\n\r\nx\r\n")
    mapped = {m.path for worker in psutil.Process(server.process.pid).children()
              for m in worker.memory_maps() if "/ingress-metrics-" in m.path}
    folder = os.path.dirname(min(mapped))
    assert os.path.dirname(folder) == "/dev/shm" and file_system_type(folder) == "tmpfs"
    assert any(name.endswith(".db") for name in os.listdir(folder))
    assert server.stop() == 0
    assert not os.path.exists(folder)


def test_only_metric_folders_nobody_holds_are_removed(tmp_path):
    folders = {name: tmp_path / name for name in ("ingress-metrics-gone", "ingress-metrics-live",
                                                  "ingress-metrics-nolock", "other")}
    for folder in folders.values():
        folder.mkdir()
        if not folder.name.endswith("nolock"):
            (folder / ".lock").touch()
    with open(folders["ingress-metrics-live"] / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        workers.remove_stale_metrics(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ingress-metrics-live", "ingress-metrics-nolock", "other"]


def test_a_taken_port_is_an_error_before_any_worker_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = server_config(tmp_path, {"server": {"workers": 2,
                                                     "listen": [f"127.0.0.1:{port}"]}})
        path = tmp_path / "ingress.json"
        path.write_text(json.dumps(config))
        done = subprocess.run([sys.executable, "-m", "ingress", "serve", "--config", str(path)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "started" not in done.stderr and done.stdout == ""
