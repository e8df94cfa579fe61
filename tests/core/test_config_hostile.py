"""Config files are untrusted input: hostile or broken files (YAML anchor bombs, deep nesting,
nan/inf, bad ports and listen addresses, bad TLS files, huge files) are refused with
``FILE: <json-pointer>: <message>`` lines by check-config, serve and a SIGHUP reload, never
with a traceback. Limits: docs/operations.md, "Config files"."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml

DEEP = 100_000
# Nine levels of nine references, 387 million strings once expanded, in 366 bytes; the old
# loader accepted it, and validating server.listen ran out of time and memory.
BOMB = "x:\n" + "".join(
    f"  {name}: &{name} [{','.join([f'*{prev}'] * 9) if prev else ','.join(['lol'] * 9)}]\n"
    for prev, name in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
) + "server:\n  listen: *i\n"


def ingress(*args):
    return subprocess.run([sys.executable, "-m", "ingress", *args], capture_output=True,
                          text=True, timeout=60)


def refused(*args) -> list[str]:
    """The error lines of a command that must exit 2 without a traceback."""
    result = ingress(*args)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    return result.stderr.splitlines()


def check(path) -> list[str]:
    return refused("check-config", str(path))


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


def test_the_bomb_is_what_it_claims():
    assert len(BOMB) < 512
    assert BOMB.splitlines()[2] == "  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]"


# -- YAML anchors and aliases -----------------------------------------------------------------


def test_yaml_anchor_bomb_is_refused(tmp_path):
    path = write(tmp_path, "bomb.yaml", BOMB)
    assert check(path) == [f"{path}: /x/a: YAML anchors and aliases are not allowed (line 2)"]


def test_even_a_harmless_alias_is_refused(tmp_path):
    path = write(tmp_path, "c.yaml", "server:\n  hostname: mx.test\n  listen:\n"
                                     "    - 127.0.0.1:2525\n    - *other\n")
    assert check(path) == [f"{path}: /server/listen/1: YAML anchors and aliases are not allowed "
                           "(line 5)"]


def test_yaml_anchor_bomb_in_the_directory_file_is_refused(tmp_path):
    people = write(tmp_path, "people.yaml", BOMB)
    path = write(tmp_path, "ingress.toml", '[directory]\nfile = "people.yaml"\n')
    assert check(path) == [f"{path}: /directory/file: /x/a in {people.resolve()}: YAML anchors "
                           "and aliases are not allowed (line 2)"]


def test_serve_refuses_an_anchor_bomb(tmp_path):
    path = write(tmp_path, "bomb.yaml", BOMB)
    assert refused("serve", "--config", str(path)) == [
        f"{path}: /x/a: YAML anchors and aliases are not allowed (line 2)"]


# -- nesting ------------------------------------------------------------------------------------

TOO_DEEP = "nested deeper than 64 levels"


# After the pointer: TOML is checked before parsing (by line), JSON while parsing (the whole
# file), and libyaml stops a flow collection 1,000 levels deep before it reports any event.
LIBYAML = ":" if yaml.__with_libyaml__ else "/a" + "/0" * 64 + ":"


@pytest.mark.parametrize("name, text, where", [
    ("c.json", '{"a": ' + "[" * DEEP + "]" * DEEP + "}", ":"),
    ("c.json", '{"a": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}", ":"),
    ("c.toml", "a = " + "[" * DEEP + "]" * DEEP + "\n", ": line 1:"),
    ("c.toml", "a = " + "{a = " * DEEP + "1" + "}" * DEEP + "\n", ": line 1:"),
    ("c.yaml", "a: " + "[" * DEEP + "]" * DEEP + "\n", LIBYAML),
    ("c.yaml", "a: " + "{a: " * DEEP + "1" + "}" * DEEP + "\n", "/a" * 65 + ":"),
], ids=["json-arrays", "json-objects", "toml-arrays", "toml-inline-tables", "yaml-flow-sequences",
        "yaml-flow-mappings"])
def test_100000_deep_nesting_is_refused(tmp_path, name, text, where):
    path = write(tmp_path, name, text)
    assert check(path) == [f"{path}: {where} {TOO_DEEP}"]


@pytest.mark.parametrize("text", [
    "[" + ".".join(["a"] * DEEP) + "]\n",
    ".".join(["a"] * DEEP) + " = 1\n",
], ids=["table-header", "dotted-key"])
def test_100000_part_toml_keys_are_refused_before_parsing(tmp_path, text):
    # tomllib takes quadratic time over the parts of one key: this would run for minutes
    path = write(tmp_path, "c.toml", "# deep\n" + text)
    assert check(path) == [f"{path}: : line 2: a dotted key of more than 64 parts ({TOO_DEEP})"]


def test_deep_yaml_block_nesting_names_where(tmp_path):
    text = "".join("  " * i + "a:\n" for i in range(100)) + "  " * 100 + "b: 1\n"
    path = write(tmp_path, "c.yaml", text)
    assert check(path) == [f"{path}: {'/a' * 65}: {TOO_DEEP}"]


def test_64_levels_are_allowed_and_65_are_not(tmp_path):
    # /a then 63 list levels: the innermost value's pointer has 64 parts
    path = write(tmp_path, "c.json", '{"a": ' + "[" * 63 + "1" + "]" * 63 + "}")
    assert check(path) == [f"{path}: /a: unknown key 'a'"]
    path = write(tmp_path, "c.json", '{"a": ' + "[" * 64 + "1" + "]" * 64 + "}")
    assert check(path) == [f"{path}: /a{'/0' * 64}: {TOO_DEEP}"]


def test_deep_nesting_in_the_directory_file_is_refused(tmp_path):
    people = write(tmp_path, "people.toml", "a = " + "[" * DEEP + "]" * DEEP + "\n")
    path = write(tmp_path, "ingress.toml", '[directory]\nfile = "people.toml"\n')
    assert check(path) == [f"{path}: /directory/file: {people.resolve()}: line 1: {TOO_DEEP}"]


# -- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text, shown", [
    ("c.toml", "[plugins.session_timeout]\nminutes = nan\n", "nan"),
    ("c.toml", "[plugins.session_timeout]\nminutes = +inf\n", "inf"),
    ("c.toml", "[plugins.session_timeout]\nminutes = -inf\n", "-inf"),
    ("c.yaml", "plugins:\n  session_timeout:\n    minutes: .nan\n", "nan"),
    ("c.yaml", "plugins:\n  session_timeout:\n    minutes: .inf\n", "inf"),
    ("c.yaml", "plugins:\n  session_timeout:\n    minutes: -.Inf\n", "-inf"),
    ("c.json", '{"plugins": {"session_timeout": {"minutes": NaN}}}', "nan"),
    ("c.json", '{"plugins": {"session_timeout": {"minutes": Infinity}}}', "inf"),
    ("c.json", '{"plugins": {"session_timeout": {"minutes": -Infinity}}}', "-inf"),
    ("c.json", '{"plugins": {"session_timeout": {"minutes": 1e999}}}', "inf"),
])
def test_numbers_that_are_not_finite_are_refused(tmp_path, name, text, shown):
    path = write(tmp_path, name, text)
    assert check(path) == [f"{path}: /plugins/session_timeout/minutes: {shown} is not allowed: "
                           "numbers must be finite"]


def test_nan_is_refused_anywhere_even_where_the_schema_wants_no_number(tmp_path):
    path = write(tmp_path, "c.toml", '[server]\nlisten = ["127.0.0.1:2525", nan]\n'
                                     "[plugins.command_timeout]\nseconds = inf\n")
    assert check(path) == [
        f"{path}: /server/listen/1: nan is not allowed: numbers must be finite",
        f"{path}: /plugins/command_timeout/seconds: inf is not allowed: numbers must be finite",
    ]


def test_nan_in_the_directory_file_is_refused(tmp_path):
    people = write(tmp_path, "people.yaml", "users:\n  - address: a@localhost\n"
                                            "    password: .nan\n")
    path = write(tmp_path, "ingress.toml", '[directory]\nfile = "people.yaml"\n')
    assert check(path) == [f"{path}: /directory/file: /users/0/password in {people.resolve()}: "
                           "nan is not allowed: numbers must be finite"]


@pytest.mark.parametrize("name, text", [
    ("c.toml", "a = " + "9" * 5000 + "\n"),
    ("c.yaml", "a: " + "9" * 5000 + "\n"),
    ("c.json", '{"a": ' + "9" * 5000 + "}"),
])
def test_a_5000_digit_integer_is_a_parse_error(tmp_path, name, text):
    path = write(tmp_path, name, text)
    [line] = check(path)
    assert line.startswith(f"{path}: : cannot parse: Exceeds the limit (4300")  # 3.10: no "digits"


def test_yaml_keys_must_be_strings(tmp_path):
    path = write(tmp_path, "c.yaml", "server:\n  2525: x\n")
    assert check(path) == [f"{path}: /server/2525: key 2525 is not a string (quote it)"]


# -- ports and listen addresses -----------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ("127.0.0.1:65536", "port 65536 is out of range (1-65535; 0: any free port)"),
    ("127.0.0.1:96313", "port 96313 is out of range (1-65535; 0: any free port)"),
    ("127.0.0.1:99999", "port 99999 is out of range (1-65535; 0: any free port)"),
])
def test_ports_out_of_range_are_refused(tmp_path, value, message):
    path = write(tmp_path, "c.toml", f'[server]\nlisten = ["{value}"]\nlisten_tls = ["{value}"]\n'
                                     f'metrics_listen = "{value}"\n')
    assert check(path) == [
        f"{path}: /server/listen/0: '{value}': {message}",
        f"{path}: /server/listen_tls/0: '{value}': {message}",
        f"{path}: /server/metrics_listen: '{value}': {message}",
    ]


NOT_HOST_PORT = "is not host:port (such as 127.0.0.1:25 or [::1]:25)"


@pytest.mark.parametrize("value, message", [
    ("garbage", f"'garbage' {NOT_HOST_PORT}"),
    ("127.0.0.1", f"'127.0.0.1' {NOT_HOST_PORT}"),
    ("127.0.0.1:", f"'127.0.0.1:' {NOT_HOST_PORT}"),
    ("127.0.0.1:abc", f"'127.0.0.1:abc' {NOT_HOST_PORT}"),
    ("127.0.0.1:-1", f"'127.0.0.1:-1' {NOT_HOST_PORT}"),
    ("127.0.0.1:123456", f"'127.0.0.1:123456' {NOT_HOST_PORT}"),
    ("127.0.0.1: 25", f"'127.0.0.1: 25' {NOT_HOST_PORT}"),
    ("::1:25", "'::1:25' is not host:port: write an IPv6 address in brackets, as in [::1]:25"),
    ("[mx.test]:25", "'[mx.test]:25': 'mx.test' is not an IPv6 address"),
    ("mx test:25", "'mx test:25': 'mx test' is not a host name or IPv4 address"),
    ("-mx.test:25", "'-mx.test:25': '-mx.test' is not a host name or IPv4 address"),
])
def test_listen_addresses_that_are_not_host_port_are_refused(tmp_path, value, message):
    path = write(tmp_path, "c.json", json.dumps({"server": {
        "listen": [value], "listen_tls": ["127.0.0.1:4650", value], "metrics_listen": value,
        "tls_cert": "x.pem", "tls_key": "y.pem"}}))
    assert check(path) == [
        f"{path}: /server/listen/0: {message}",
        f"{path}: /server/listen_tls/1: {message}",
        f"{path}: /server/metrics_listen: {message}",
    ]


def test_good_listen_addresses_pass(tmp_path):
    path = write(tmp_path, "c.toml", '[server]\nlisten = ["127.0.0.1:25", "[::1]:65535", '
                                     '"localhost:1", ":2525", "127.0.0.1:0"]\n'
                                     'metrics_listen = "[::]:9125"\n')
    result = ingress("check-config", str(path))
    assert result.returncode == 0, result.stderr


def test_serve_refuses_a_garbage_metrics_listen(tmp_path):
    # it used to pass check-config and then crash serve with a traceback
    path = write(tmp_path, "c.toml", '[server]\nlisten = ["127.0.0.1:0"]\n'
                                     'metrics_listen = "garbage"\n')
    assert refused("serve", "--config", str(path)) == [
        f"{path}: /server/metrics_listen: 'garbage' {NOT_HOST_PORT}"]


def test_serve_refuses_a_port_that_would_wrap(tmp_path):
    path = write(tmp_path, "c.toml", '[server]\nlisten = ["127.0.0.1:96313"]\n')
    assert refused("serve", "--config", str(path)) == [
        f"{path}: /server/listen/0: '127.0.0.1:96313': port 96313 is out of range "
        "(1-65535; 0: any free port)"]


# -- TLS files ----------------------------------------------------------------------------------


def tls_config(tmp_path, cert, key):
    return write(tmp_path, "c.json", json.dumps({"server": {"tls_cert": str(cert),
                                                            "tls_key": str(key)}}))


def test_missing_tls_files_are_refused(tmp_path, tls):
    path = tls_config(tmp_path, tmp_path / "nope.pem", tmp_path / "gone.pem")
    assert check(path) == [
        f"{path}: /server/tls_cert: {tmp_path / 'nope.pem'}: cannot read: No such file or "
        "directory",
        f"{path}: /server/tls_key: {tmp_path / 'gone.pem'}: cannot read: No such file or "
        "directory",
    ]
    path = tls_config(tmp_path, tls.cert, tmp_path)
    assert check(path) == [f"{path}: /server/tls_key: {tmp_path}: cannot read: Is a directory"]


def test_unreadable_tls_key_is_refused(tmp_path, tls):
    tls.key.chmod(0)
    try:
        tls.key.read_bytes()
        pytest.skip("running as a user who can read any file")
    except PermissionError:
        pass
    path = tls_config(tmp_path, tls.cert, tls.key)
    assert check(path) == [f"{path}: /server/tls_key: {tls.key}: cannot read: Permission denied"]


def test_garbage_tls_files_are_refused(tmp_path, tls):
    garbage = write(tmp_path, "garbage.pem", "this is not PEM\n")
    path = tls_config(tmp_path, garbage, garbage)
    assert check(path) == [
        f"{path}: /server/tls_cert: {garbage}: no PEM certificate in this file",
        f"{path}: /server/tls_key: {garbage}: no PEM private key in this file",
    ]
    broken = write(tmp_path, "broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n"
                                           "-----END CERTIFICATE-----\n")
    path = tls_config(tmp_path, broken, tls.key)
    [line] = check(path)
    assert line.startswith(f"{path}: /server/tls_cert: cannot load {broken} with {tls.key}: ")


def test_a_key_of_another_certificate_is_refused(tmp_path, tls, tls_ca):
    other = tmp_path / "other-key.pem"
    tls_ca.issue_cert("other.test").private_key_pem.write_to_path(str(other))
    path = tls_config(tmp_path, tls.cert, other)
    assert check(path) == [f"{path}: /server/tls_key: {other}: this key does not belong to the "
                           f"certificate in {tls.cert}"]


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(tmp_path, tls):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(tls.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    path = tls_config(tmp_path, tls.cert, encrypted)
    assert check(path) == [f"{path}: /server/tls_key: {encrypted}: the private key is encrypted "
                           "(a key with a passphrase cannot be used)"]


def test_serve_refuses_a_garbage_tls_cert(tmp_path, tls):
    garbage = write(tmp_path, "garbage.pem", "junk")
    path = tls_config(tmp_path, garbage, tls.key)
    assert refused("serve", "--config", str(path)) == [
        f"{path}: /server/tls_cert: {garbage}: no PEM certificate in this file"]


def test_a_good_pair_passes(tmp_path, tls):
    result = ingress("check-config", str(tls_config(tmp_path, tls.cert, tls.key)))
    assert result.returncode == 0, result.stderr


# -- size ---------------------------------------------------------------------------------------


def test_a_2_gb_config_file_is_refused_unread(tmp_path):
    path = tmp_path / "huge.toml"
    with open(path, "wb") as file:
        file.truncate(2 * 1024**3)  # sparse: takes no disk space
    assert check(path) == [f"{path}: : file too large (2147483648 bytes; the limit is 1048576)"]
    people = path.rename(tmp_path / "people.toml")
    main = write(tmp_path, "ingress.toml", '[directory]\nfile = "people.toml"\n')
    assert check(main) == [f"{main}: /directory/file: {people.resolve()}: file too large "
                           "(2147483648 bytes; the limit is 1048576)"]


def test_a_device_is_read_no_further_than_the_limit(tmp_path):
    path = tmp_path / "zero.toml"
    path.symlink_to("/dev/zero")
    assert check(path) == [f"{path}: : file too large (over 1048576 bytes)"]


@pytest.mark.parametrize("name, text", [
    ("c.json", '{"a": [' + ",".join(["1"] * 100_000) + "]}"),
    ("c.yaml", "a: [" + ",".join(["1"] * 100_000) + "]\n"),
    ("c.toml", "a = [" + ",".join(["1"] * 100_000) + "]\n"),
])
def test_more_than_100000_values_are_refused(tmp_path, name, text):
    path = write(tmp_path, name, text)
    assert check(path) == [f"{path}: : more than 100000 values"]


# -- SIGHUP reload ------------------------------------------------------------------------------

USERS = {"domains": ["example.test"],
         "users": [{"address": "alice@example.test", "password": "pw"}]}


def still_serving(server, count: int) -> None:
    """A new session after the refused reload: the old config (and its directory) still works."""
    with server.smtp() as client:
        client.sendmail("s@example.org", ["alice@example.test"], "Subject: s\r\n\r\nx\r\n")
    assert len(server.mailbox("alice@example.test")) == count


def reload_refused(server, line: str) -> None:
    server.signal(signal.SIGHUP)
    expected = f"reload refused, keeping the old config: {line}"
    from ingress.testing import eventually

    eventually(lambda: expected in server.log(), what=expected)
    assert "Traceback" not in server.log()


def test_reload_of_an_anchor_bomb_in_the_directory_file_keeps_serving(ingress_server, tmp_path):
    people = tmp_path / "people.yaml"
    people.write_text(json.dumps(USERS))  # JSON is YAML
    server = ingress_server({"directory": {"file": str(people), "domains": []}})
    still_serving(server, 1)
    people.write_text(BOMB)
    reload_refused(server, f"{server.config_path}: /directory/file: /x/a in {people}: YAML "
                           "anchors and aliases are not allowed (line 2)")
    still_serving(server, 2)


@pytest.mark.parametrize("change, line", [
    ({"deep": '{"a": ' + "[" * DEEP + "]" * DEEP + "}"}, f": {TOO_DEEP}"),
    ({"plugins": {"session_timeout": {"minutes": float("nan")}}},
     "/plugins/session_timeout/minutes: nan is not allowed: numbers must be finite"),
    ({"server": {"listen": ["127.0.0.1:96313"]}},
     "/server/listen/0: '127.0.0.1:96313': port 96313 is out of range (1-65535; 0: any free "
     "port)"),
    ({"server": {"metrics_listen": "garbage"}},
     f"/server/metrics_listen: 'garbage' {NOT_HOST_PORT}"),
    ({"server": {"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}},
     "/server/tls_cert: /nonexistent/cert.pem: cannot read: No such file or directory"),
], ids=["deep", "nan", "port", "metrics_listen", "tls_cert"])
def test_reload_of_a_hostile_config_keeps_the_old_one(ingress_server, change, line):
    server = ingress_server({"directory": USERS})
    still_serving(server, 1)
    if "deep" in change:
        text = change["deep"]
    else:
        data = json.loads(server.config_path.read_text())
        for section, values in change.items():
            data.setdefault(section, {}).update(values)
        text = json.dumps(data)  # writes nan as NaN
    server.config_path.write_text(text)
    reload_refused(server, f"{server.config_path}: {line}")
    still_serving(server, 2)
