"""The command line: check-config, schema, plugins, and serve's refusal of bad configs."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
import re
import subprocess
import sys

import pytest


def ingress(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=60)


def write(tmp_path, text, name="ingress.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_config_passes(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "mx.example.test"\n[plugins.banner]\n'
                           'text = "hello"\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_misspelt_key_names_file_and_its_own_pointer(tmp_path):
    path = write(tmp_path, '[plugins.banner]\ntxet = "hello"\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert f"{path}: /plugins/banner/txet: unknown key 'txet'" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr


def test_every_error_is_reported_not_just_the_first(tmp_path):
    path = write(tmp_path, '[server]\nworkers = "two"\nlisten = "x"\nbogus = 1\n'
                           '[plugins.received_header]\nappend = "sometimes"\n')
    lines = ingress("check-config", str(path)).stderr.splitlines()
    pointers = {line.split(": ")[1] for line in lines}
    assert {"/server/workers", "/server/listen", "/server/bogus",
            "/plugins/received_header/append"} <= pointers
    assert all(line.startswith(f"{path}: /") for line in lines)


def test_unknown_plugin_section_is_an_error(tmp_path):
    path = write(tmp_path, "[plugins.no_such_plugin]\n")
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: /plugins/no_such_plugin: unknown key 'no_such_plugin': no plugin of that name is "
        "installed (neither a builtin, nor an entry point of group 'ingress.plugins', nor in "
        "server.plugin_modules)"]


def test_unparsable_file(tmp_path):
    path = write(tmp_path, "[server\nhostname=")
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}: : cannot parse")  # "": the whole file
    assert "Traceback" not in result.stderr


def test_missing_file(tmp_path):
    result = ingress("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


@pytest.mark.parametrize("name,text", [
    ("c.json", json.dumps({"plugins": {"banner": {"txet": "x"}}})),
    ("c.yaml", "plugins:\n  banner:\n    txet: x\n"),
])
def test_json_and_yaml_are_validated_the_same_way(tmp_path, name, text):
    path = write(tmp_path, text, name)
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert f"{path}: /plugins/banner/txet: unknown key 'txet'" in result.stderr


def test_directory_errors_carry_pointers(tmp_path):
    path = write(tmp_path, '[directory]\ndomains = ["Example.TEST"]\n'
                           '[[directory.users]]\naddress = "bob@example.test"\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert f"{path}: /directory/users/0/password:" in result.stderr


def test_tls_cert_without_key(tmp_path):
    path = write(tmp_path, '[server]\ntls_cert = "cert.pem"\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert "/server/tls_key" in result.stderr


def test_plugin_module_that_fails_to_import_is_named(tmp_path):
    path = write(tmp_path, '[server]\nplugin_modules = ["broken_import"]\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert "/server/plugin_modules/0: plugin module 'broken_import' failed to import" \
        in result.stderr
    assert "broken on purpose" in result.stderr


def test_misspelt_hook_name_is_a_startup_error_naming_the_plugin(tmp_path):
    path = write(tmp_path, '[server]\nplugin_modules = ["bad_hook"]\n[plugins.bad_hook]\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert "plugin 'bad_hook'" in result.stderr
    assert "on_conect" in result.stderr
    result = ingress("serve", "--config", str(path))
    assert result.returncode == 2
    assert "on_conect" in result.stderr


def test_third_party_plugin_may_not_take_a_builtin_name(tmp_path):
    path = write(tmp_path, '[server]\nplugin_modules = ["clash"]\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    assert "has the name of a builtin plugin" in result.stderr


def test_third_party_schema_is_merged_and_applied(tmp_path):
    path = write(tmp_path, '[server]\nplugin_modules = ["with_schema"]\n'
                           '[plugins.with_schema]\ngreting = "x"\n')
    result = ingress("check-config", str(path))
    assert f"{path}: /plugins/with_schema/greting: unknown key 'greting'" in result.stderr
    path = write(tmp_path, '[server]\nplugin_modules = ["with_schema"]\n'
                           '[plugins.with_schema]\ngreeting = "x"\n')
    assert ingress("check-config", str(path)).returncode == 0


def test_schema_formats_are_enforced(tmp_path):
    """A regex that does not compile used to pass check-config and then answer every message
    with 451 and a traceback; so did addresses that are not addresses."""
    path = write(tmp_path, '[server]\nplugin_modules = ["with_formats"]\n'
                           '[plugins.with_formats]\nsubject_pattern = "(unclosed"\n'
                           'trusted_ip = "300.1.2.3"\ntrusted_ip6 = "2001:db8::g"\n'
                           'network = "10.0.0.0/33"\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == (f"{path}: /plugins/with_formats/network: '10.0.0.0/33' is not an IP "
                        "address or CIDR network")
    assert lines[1].startswith(f"{path}: /plugins/with_formats/subject_pattern: '(unclosed' is "
                               "not a valid regex: ")
    assert lines[2].startswith(f"{path}: /plugins/with_formats/trusted_ip: '300.1.2.3' is not a "
                               "valid ipv4")
    assert lines[3].startswith(f"{path}: /plugins/with_formats/trusted_ip6: '2001:db8::g' is "
                               "not a valid ipv6")
    assert "Traceback" not in result.stderr
    good = write(tmp_path, '[server]\nplugin_modules = ["with_formats"]\n[plugins.with_formats]\n'
                           'subject_pattern = "^spam@"\n', name="good.toml")
    assert ingress("check-config", str(good)).returncode == 0


def test_serve_refuses_an_invalid_config(tmp_path):
    path = write(tmp_path, '[plugins.banner]\ntxet = "hello"\n')
    result = ingress("serve", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}: /plugins/banner/txet: unknown key 'txet'" in result.stderr


def test_schema_is_the_merged_draft_2020_12_schema():
    result = ingress("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    plugins = schema["properties"]["plugins"]["properties"]
    assert plugins["banner"]["properties"]["text"]["default"] == "#HostName# ESMTP"
    assert plugins["received_header"]["properties"]["append"]["enum"] == [
        "all", "unauthenticated", "none"]
    assert set(schema["properties"]) == {"server", "directory", "delivery", "plugins"}


def test_schema_of_a_config_holds_exactly_the_plugins_it_enables(tmp_path):
    path = write(tmp_path, '[server]\nplugin_modules = ["with_schema"]\n[plugins.with_schema]\n')
    result = ingress("schema", "--config", str(path))
    assert result.returncode == 0, result.stderr
    plugins = json.loads(result.stdout)["properties"]["plugins"]["properties"]
    assert "greeting" in plugins["with_schema"]["properties"]
    assert "banner" in plugins
    bad = ingress("schema", "--config", str(write(tmp_path, "[plugins.banner]\ntxet = 1\n")))
    assert bad.returncode == 2 and "/plugins/banner/txet" in bad.stderr


def test_check_config_without_a_file_checks_the_embedded_default(tmp_path):
    result = ingress("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<embedded default>: OK")


def test_hash_password_makes_hashes_the_directory_accepts(tmp_path):
    import argon2
    import bcrypt

    made = {}
    for flag in ("", "--bcrypt"):
        done = subprocess.run([sys.executable, "-m", "ingress", "hash-password",
                               *filter(None, [flag])], input="s3cret pass\n",
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        made[flag] = done.stdout.strip()
    assert made[""].startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(made[""], "s3cret pass")
    assert bcrypt.checkpw(b"s3cret pass", made["--bcrypt"].encode())
    users = "".join(f'[[directory.users]]\naddress = "u{i}@localhost"\npassword_hash = "{h}"\n'
                    for i, h in enumerate(made.values()))
    assert ingress("check-config", str(write(tmp_path, users))).returncode == 0
    empty = subprocess.run([sys.executable, "-m", "ingress", "hash-password"], input="\n",
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "empty password" in empty.stderr


def test_plugins_lists_name_source_and_hooks(tmp_path):
    result = ingress("plugins")
    assert result.returncode == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()}
    assert rows["banner"][1] == "builtin"
    assert "greeting" in rows["banner"][2]
    assert rows["received_header"][1] == "builtin"
    path = write(tmp_path, '[server]\nplugin_modules = ["with_schema"]\n[plugins.with_schema]\n')
    result = ingress("plugins", "--config", str(path))
    rows = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()}
    assert rows["with_schema"][1] == "module with_schema"
    assert "on_command" in rows["with_schema"][2]


def test_json_log_lines(tmp_path):
    import signal
    import smtplib

    config = {"server": {"hostname": "mx.test", "listen": ["127.0.0.1:0"]},
              "directory": {"domains": ["localhost"],
                            "domain_settings": {"localhost": {"catch_all": True}}},
              "delivery": {"maildir": str(tmp_path / "m"), "queue": str(tmp_path / "q")}}
    path = write(tmp_path, json.dumps(config), "c.json")
    proc = subprocess.Popen([sys.executable, "-m", "ingress", "--log-format", "json", "serve",
                             "--config", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1].split()[0])
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@example.org", ["x@localhost"], "Subject: j\r\n\r\nx\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    records = [json.loads(line) for line in err.splitlines()]
    accepted = [r for r in records if r["message"].startswith("accepted ")]
    assert len(accepted) == 1 and accepted[0]["level"] == "info"
    assert "from=<a@example.org>" in accepted[0]["message"]


def fake_distribution(tmp_path, entry_points: str):
    """A distribution installed only on PYTHONPATH: a dist-info with entry points."""
    site = tmp_path / "site"
    info = site / "fake_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ingress.plugins]\n" + entry_points)
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return env


def test_entry_point_plugins_are_listed_and_enabled_by_their_section(tmp_path):
    env = fake_distribution(tmp_path, "greeter = with_schema\nbroken = broken_import\n")
    rows = {line.split("\t")[0]: line for line in ingress("plugins", env=env).stdout.splitlines()}
    assert "entry point fake-plugins (installed, not enabled)" in rows["greeter"]
    assert "broken: ImportError: this plugin is broken on purpose" in rows["broken"]
    schema = json.loads(ingress("schema", env=env).stdout)
    assert "greeter" in schema["properties"]["plugins"]["properties"]
    assert "broken" not in schema["properties"]["plugins"]["properties"]
    # Installed but without a section: not active, and the broken one is no error.
    path = write(tmp_path, '[server]\nhostname = "h"\n')
    assert ingress("check-config", str(path), env=env).returncode == 0
    path = write(tmp_path, '[plugins.greeter]\ngreeting = "hello from an entry point"\n')
    result = ingress("plugins", "--config", str(path), env=env)
    assert "greeter\tentry point fake-plugins\t" in result.stdout
    path = write(tmp_path, "[plugins.broken]\n")
    result = ingress("check-config", str(path), env=env)
    assert result.returncode == 2
    assert "/plugins/broken: plugin 'broken' (entry point fake-plugins) failed to import" \
        in result.stderr


def test_entry_point_with_a_builtin_name_is_refused_when_configured(tmp_path):
    env = fake_distribution(tmp_path, "banner = with_schema\n")
    path = write(tmp_path, '[plugins.banner]\ntext = "x"\n')
    result = ingress("check-config", str(path), env=env)
    assert result.returncode == 2
    assert "has the name of a builtin plugin" in result.stderr


class CountingStream(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_log_lines_of_one_loop_iteration_are_written_together_and_in_order():
    from ingress.cli import BatchingHandler, TextFormatter

    stream = CountingStream()
    handler = BatchingHandler(stream)
    handler.setFormatter(TextFormatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("ingress.test-batching")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)

    async def main():
        for i in range(3):
            logger.info("line %d", i)
        assert stream.writes == 1, "nothing written inside the iteration"
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert stream.writes == 2, "the three lines in one write"
        logger.info("line 3")

    try:
        logger.info("before the loop")
        assert stream.writes == 1, "outside a loop a line is written at once"
        asyncio.run(main())
        handler.flush()
        logger.info("after the loop")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "before the loop", "line 0", "line 1", "line 2", "line 3", "after the loop"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", " ".join(
        lines[0].split(" ")[:2]))


@pytest.mark.parametrize("flags", [(), ("--no-uvloop",)])
def test_serve_uses_uvloop_when_installed_unless_told_not_to(tmp_path, flags):
    from ingress.testing import server_config, start_subprocess

    expected = "uvloop" if importlib.util.find_spec("uvloop") and not flags else "asyncio"
    config = server_config(tmp_path, {"directory": {"domains": ["example.test"], "users": [
        {"address": "alice@example.test", "password": "pw"}]}})
    server = start_subprocess(config, tmp_path, args=flags)
    try:
        with server.smtp() as client:
            client.sendmail("s@example.org", ["alice@example.test"], "Subject: s\r\n\r\nx\r\n")
        assert len(server.mailbox("alice@example.test")) == 1
    finally:
        assert server.stop() == 0
    assert f"event loop: {expected}" in server.log()
