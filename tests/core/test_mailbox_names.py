"""Every local address of the directory must be a safe Maildir folder name (the catch-all rule),
and the Maildir writer refuses a path outside its root whatever it is handed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ingress.delivery import maildir
from ingress.directory import Directory, DirectoryError
from ingress.spool import Message
from ingress.testing import eventually

D = ["example.test"]
ESCAPE = '"/../../../../escaped"@example.test'


def errors_of(section: dict) -> list[tuple[str, str]]:
    with pytest.raises(DirectoryError) as info:
        Directory.from_config(section, Path("/nonexistent"))
    return info.value.errors


@pytest.mark.parametrize("section, pointer", [
    ({"domains": D, "aliases": {"x@example.test": ["ok@example.test", ESCAPE]}},
     "/directory/aliases/x@example.test/1"),
    ({"domains": D, "lists": {"l@example.test": ['"a/b"@example.test']}},
     "/directory/lists/l@example.test/0"),
    ({"domains": D, "users": [{"address": "a/b/c@example.test", "password": "x"}]},
     "/directory/users/0/address"),
    ({"domains": D, "aliases": {'"."@example.test': ["ok@example.test"]}},
     '/directory/aliases/"."@example.test'),
    ({"domains": D, "lists": {'"a..b"@example.test': ["ok@example.test"]}},
     '/directory/lists/"a..b"@example.test'),
    ({"domains": D, "users": [{"address": "j\u2215rg@example.test", "password": "x"}]},
     "/directory/users/0/address"),
])
def test_unsafe_local_parts_are_config_errors(section, pointer):
    errors = errors_of(section)
    assert [p for p, _ in errors] == [pointer], errors
    assert "not a safe folder name" in errors[0][1]


def test_members_outside_the_local_domains_are_not_folders_here():
    directory = Directory.from_config(
        {"domains": D, "aliases": {"x@example.test": ['"a/b"@elsewhere.test', "ok@example.test"]}},
        Path("/nonexistent"))
    assert directory.expand("x@example.test") == ['"a/b"@elsewhere.test', "ok@example.test"]


def test_one_rule_for_catch_all_and_directory():
    assert not Directory.is_safe_local_part('"/../../../../escaped"')
    directory = Directory.from_config(
        {"domains": D, "domain_settings": {"example.test": {"catch_all": True}}}, Path("/x"))
    assert not directory.mailbox_exists(ESCAPE)
    assert not directory.mailbox_exists("a/b/c@example.test")


def test_errors_in_the_external_file_name_it(tmp_path):
    (tmp_path / "dir.json").write_text(json.dumps({"aliases": {"x@example.test": [ESCAPE]}}))
    [(pointer, message)] = errors_of({"domains": D, "file": str(tmp_path / "dir.json")})
    assert pointer == "/directory/file"
    assert f"/aliases/x@example.test/0 in {tmp_path / 'dir.json'}:" in message
    assert "not a safe folder name" in message


def ingress(*args):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, timeout=60)


def unsafe_config(tmp_path) -> Path:
    path = tmp_path / "ingress.toml"
    path.write_text(f'[delivery]\nmaildir = "{tmp_path / "mail"}"\nqueue = "{tmp_path / "q"}"\n'
                    '[directory]\ndomains = ["example.test"]\n'
                    f'[directory.aliases]\n"x@example.test" = [{json.dumps(ESCAPE)}]\n'
                    '[[directory.users]]\naddress = "a/b/c@example.test"\npassword = "x"\n')
    return path


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_check_config_and_serve_refuse_unsafe_addresses(tmp_path, command):
    path = unsafe_config(tmp_path)
    result = ingress(*(["check-config", str(path)] if command == "check-config"
                       else ["serve", "--config", str(path)]))
    assert result.returncode == 2, result.stderr
    assert f"{path}: /directory/aliases/x@example.test/0: '{ESCAPE}': the local part is " \
           "not a safe folder name" in result.stderr
    assert f"{path}: /directory/users/0/address: 'a/b/c@example.test':" in result.stderr
    assert not (tmp_path / "escaped").exists()


def test_reload_refuses_unsafe_addresses_and_nothing_escapes(ingress_server, tmp_path):
    server = ingress_server({"directory": {"domains": D,
                                           "aliases": {"x@example.test": ["ok@example.test"]}}})
    config = json.loads(server.config_path.read_text())
    config["directory"]["aliases"]["x@example.test"] = [ESCAPE]
    server.config_path.write_text(json.dumps(config))
    server.signal(signal.SIGHUP)
    eventually(lambda: "reload refused" in server.log(), what="refusal")
    assert "/directory/aliases/x@example.test/0" in server.log()
    with server.smtp() as client:
        client.sendmail("s@example.org", ["x@example.test"], "Subject: hi\r\n\r\nx\r\n")
    assert len(server.mailbox("ok@example.test")) == 1
    assert [p.relative_to(server.maildir).parts[:2] for p in server.all_messages()] == [
        ("example.test", "ok")]
    assert not list(tmp_path.rglob("escaped"))


@pytest.mark.parametrize("domain, local", [
    ("example.test", '"/../../../../escaped"'), ("example.test", "a/b/c"),
    ("example.test", ".."), ("example.test", ""), ("..", "alice"), ("a/b", "alice"),
    ("example.test", "../escaped"),
])
def test_maildir_refuses_paths_outside_its_root(tmp_path, domain, local):
    message = Message(tmp_path / "spool", None)
    message.write(b"Subject: x\r\n\r\nbody\r\n")
    root = tmp_path / "deep" / "er" / "mail"
    with pytest.raises(PermissionError):
        maildir.deliver(root, [("example.test", "fine"), (domain, local)], b"", message, "mx")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [], "nothing written anywhere"
