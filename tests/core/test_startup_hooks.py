"""The startup and shutdown hooks: run in every worker after the fork, before listening and
after draining; a plugin can refuse the start with a clear message."""

from __future__ import annotations

import pytest


def config(tmp_path, **settings) -> dict:
    return {"server": {"plugin_modules": ["lifecycle"], **settings.pop("server", {})},
            "plugins": {"lifecycle": {"record": str(tmp_path / "record"), **settings}}}


def records(tmp_path) -> list[tuple[str, ...]]:
    return [tuple(line.split()) for line in (tmp_path / "record").read_text().splitlines()]


def test_startup_before_listening_and_shutdown_after_draining(ingress_server, tmp_path):
    server = ingress_server(config(tmp_path))
    assert records(tmp_path) == [("startup", "mx.test", str(server.pid))]
    with server.smtp() as client:
        assert client.noop()[0] == 250
    assert server.stop() == 0
    assert records(tmp_path)[1:] == [("shutdown", str(server.pid))]


def test_each_worker_starts_its_plugins_after_the_fork(ingress_server, tmp_path):
    server = ingress_server(config(tmp_path, server={"workers": 2}))
    started = {pid for what, _, pid in records(tmp_path) if what == "startup"}
    assert len(started) == 2 and str(server.pid) not in started
    assert server.stop() == 0
    assert {r[1] for r in records(tmp_path) if r[0] == "shutdown"} == started


@pytest.mark.parametrize("fail, line", [
    ("refuse", "lifecycle: the service it needs says no"),
    ("raise", "plugin lifecycle failed in startup: RuntimeError: plugin bug"),
])
def test_a_plugin_can_refuse_the_start(ingress_server, tmp_path, fail, line):
    with pytest.raises(RuntimeError) as failed:
        ingress_server(config(tmp_path, fail=fail))
    assert "exited (2)" in str(failed.value)
    assert line in str(failed.value)
    assert "Traceback" not in str(failed.value)
