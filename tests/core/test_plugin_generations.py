"""Plugins across config generations: checks beyond the schema (check_settings) at
check-config, start and reload; one plugin object per process whatever the entry point names;
startup once per object, config_loaded once per generation, shutdown once at exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from ingress.testing import eventually


def ingress(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def checks_config(tmp_path, **settings):
    path = tmp_path / "ingress.json"
    path.write_text(json.dumps({"server": {"plugin_modules": ["with_checks"]},
                                "plugins": {"with_checks": settings}}))
    return path


def test_check_settings_problems_are_config_errors_with_pointers(tmp_path):
    path = checks_config(tmp_path, patterns=["^ok$", "(unclosed"], list_file="lists/x.txt",
                         low=5, high=3)
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: /plugins/with_checks/patterns/1: '(unclosed' does not compile: missing ), "
        "unterminated subpattern at position 0",
        f"{path}: /plugins/with_checks/list_file: no such file: {tmp_path / 'lists/x.txt'}",
        f"{path}: /plugins/with_checks: low must be below high",
    ]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/x.txt").write_text("x\n")
    path = checks_config(tmp_path, patterns=["^ok$"], list_file="lists/x.txt")
    assert ingress("check-config", str(path)).returncode == 0


def test_a_failing_check_names_the_plugin_without_a_traceback(tmp_path):
    result = ingress("check-config", str(checks_config(tmp_path, bug=True)))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{tmp_path / 'ingress.json'}: /plugins/with_checks: plugin with_checks failed in "
        "check_settings: KeyError: 'oops'"]


def test_the_server_refuses_to_start_and_to_reload_with_such_settings(ingress_server, tmp_path):
    with pytest.raises(RuntimeError) as failed:
        ingress_server({"server": {"plugin_modules": ["with_checks"]},
                        "plugins": {"with_checks": {"patterns": ["("]}}})
    assert "/plugins/with_checks/patterns/0: '(' does not compile" in str(failed.value)
    server = ingress_server({"server": {"plugin_modules": ["with_checks"]},
                             "plugins": {"with_checks": {"patterns": ["^bad@"]}}})
    data = json.loads(server.config_path.read_text())
    data["plugins"]["with_checks"]["patterns"] = ["^other@", "[z-a]"]
    server.config_path.write_text(json.dumps(data))
    server.signal(signal.SIGHUP)
    eventually(lambda: "reload refused" in server.log(), what="refused reload")
    assert "/plugins/with_checks/patterns/1: '[z-a]' does not compile" in server.log()
    with server.smtp() as client:  # the old settings still apply
        client.ehlo()
        assert client.mail("bad@example.org")[0] == 550
        assert client.rset()[0] == 250
        assert client.mail("other@example.org")[0] == 250


def test_an_async_check_settings_is_refused_at_registration(tmp_path):
    module = tmp_path / "async_check.py"
    module.write_text("from ingress import hookimpl\n\n@hookimpl\n"
                      "async def check_settings(settings):\n    return None\n")
    path = tmp_path / "ingress.json"
    path.write_text(json.dumps({"server": {"plugin_modules": ["async_check"]},
                                "plugins": {"async_check": {}}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]]))
    result = ingress("check-config", str(path), env=env)
    assert result.returncode == 2
    assert "hook check_settings must be a plain def" in result.stderr
    assert "Traceback" not in result.stderr


def class_entry_point(tmp_path) -> dict:
    """Install tests/helpers/generations.py's class as the entry point ``generations``."""
    site = tmp_path / "site"
    info = site / "gen_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gen-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ingress.plugins]\ngenerations = "
                                           "generations:Recorder\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])}


def records(tmp_path) -> list[list[str]]:
    path = tmp_path / "record"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def reload_with(server, plugins: dict) -> None:
    data = json.loads(server.config_path.read_text())
    data["plugins"] = plugins
    server.config_path.write_text(json.dumps(data))
    before = server.log().count("reloaded")
    server.signal(signal.SIGHUP)
    eventually(lambda: server.log().count("reloaded") > before, what="reload")


def greeting(server) -> str:
    with server.raw() as raw:
        code, text = raw.reply()
        assert code == 220
        return text


def test_one_object_serves_every_generation(ingress_server, tmp_path):
    record = str(tmp_path / "record")
    server = ingress_server({"plugins": {"generations": {"record": record}}},
                            env=class_entry_point(tmp_path))
    assert greeting(server) == "one connection 1"
    reload_with(server, {"generations": {"record": record, "label": "two"}})
    # The object counted on: the entry point's class was not instantiated again.
    assert greeting(server) == "two connection 2"
    assert server.stop() == 0
    calls = [(r[0], r[1]) for r in records(tmp_path)]
    assert calls == [("startup", "one"), ("config_loaded", "one"), ("config_loaded", "two"),
                     ("shutdown", "two")]
    assert len({r[-2] for r in records(tmp_path)}) == 1  # one object
    assert {r[-1] for r in records(tmp_path)} == {str(server.pid)}


def test_a_reload_starts_the_plugins_it_activates_and_exit_stops_the_ones_it_dropped(
        ingress_server, tmp_path):
    record = str(tmp_path / "record")
    env = class_entry_point(tmp_path)
    server = ingress_server({"plugins": {}}, env=env)
    assert records(tmp_path) == []
    reload_with(server, {"generations": {"record": record, "label": "added"}})
    assert [r[:2] for r in records(tmp_path)] == [["startup", "added"],
                                                  ["config_loaded", "added"]]
    assert greeting(server) == "added connection 1"
    reload_with(server, {})  # deactivated: no greeting of its own any more, but not stopped yet
    assert "connection" not in greeting(server)
    assert len(records(tmp_path)) == 2
    reload_with(server, {"generations": {"record": record, "label": "back"}})
    assert greeting(server) == "back connection 2"  # the same object, not started again
    reload_with(server, {})
    assert server.stop() == 0
    assert [r[:2] for r in records(tmp_path)] == [
        ["startup", "added"], ["config_loaded", "added"], ["config_loaded", "back"],
        ["shutdown", "back"]]


def test_a_failing_config_loaded_refuses_the_start_but_not_a_reload(ingress_server, tmp_path):
    record = str(tmp_path / "record")
    env = class_entry_point(tmp_path)
    with pytest.raises(RuntimeError) as failed:
        ingress_server({"plugins": {"generations": {"record": record, "fail_loaded": True}}},
                       env=env)
    assert ("plugin generations failed in config_loaded: RuntimeError: cannot take these "
            "settings") in str(failed.value)
    server = ingress_server({"plugins": {"generations": {"record": record}}}, env=env)
    reload_with(server, {"generations": {"record": record, "label": "x", "fail_loaded": True}})
    assert "plugin generations failed in config_loaded" in server.log()
    assert greeting(server).startswith("x connection")  # the generation took effect


def test_the_unit_harness_checks_settings_as_a_config_load_does():
    import with_checks

    from ingress.errors import ConfigError
    from ingress.testing import PluginHarness

    with pytest.raises(ConfigError) as failed:
        PluginHarness(with_checks, {"patterns": ["("]})
    assert failed.value.lines == [
        "with_checks (test config): /plugins/with_checks/patterns/0: '(' does not compile: "
        "missing ), unterminated subpattern at position 0"]
    assert PluginHarness(with_checks, {"patterns": ["x"]}).settings["patterns"] == ["x"]
