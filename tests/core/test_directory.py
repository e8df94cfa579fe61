"""Tests for ingress.directory: validation, normalisation, merging, lookups, passwords."""

from __future__ import annotations

import json
from pathlib import Path

import argon2
import bcrypt
import pytest

import ingress.directory as directory_module
from ingress.directory import Directory, DirectoryError, DomainSettings, User

# Cheap parameters keep the tests fast; verify() reads them from the hash itself.
FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
BCRYPT_HASH = bcrypt.hashpw(b"bcrypt-pw", bcrypt.gensalt(rounds=4)).decode()


def build(section: dict, base_dir: Path | None = None) -> Directory:
    return Directory.from_config(section, base_dir or Path("/nonexistent"))


def errors_of(section: dict, base_dir: Path | None = None) -> list[tuple[str, str]]:
    with pytest.raises(DirectoryError) as info:
        build(section, base_dir)
    return info.value.errors


def pointers(section: dict, base_dir: Path | None = None) -> list[str]:
    return [pointer for pointer, _ in errors_of(section, base_dir)]


def user(address: str, **extra) -> dict:
    return {"address": address, "password": "pw", **extra}


# -- defaults and normalisation -----------------------------------------------------------------


def test_empty_section_gets_defaults():
    directory = build({})
    assert directory.domains == frozenset({"localhost"})
    assert directory.is_local_domain("LOCALHOST")
    assert directory.user("a@localhost") is None
    assert directory.has_plaintext_passwords is False
    assert directory.domain_settings("localhost") == DomainSettings()


def test_normalisation_is_case_insensitive_but_keeps_local_part_case():
    directory = build({
        "domains": [" Example.TEST ", "other.test"],
        "users": [user("Alice@EXAMPLE.test", name="Alice", send_as=["Boss@Example.Test"])],
        "aliases": {"Sales@Example.Test": ["Alice@Example.TEST", "ext@Far.Away"]},
        "lists": {"team@OTHER.test": ["alice@example.test"]},
        "domain_settings": {"EXAMPLE.test": {"catch_all": True}},
    })
    assert directory.domains == frozenset({"example.test", "other.test"})
    found = directory.user("ALICE@example.TEST")
    assert found == User("Alice@example.test", "Alice", "pw", None, ("Boss@example.test",))
    assert directory.alias_members("sales@example.test") == ("Alice@example.test", "ext@far.away")
    assert directory.alias_members("TEAM@other.test") == ("alice@example.test",)
    assert directory.alias_members("alice@example.test") is None
    assert directory.domain_settings("Example.Test") == DomainSettings(catch_all=True)
    assert directory.domain_settings("other.test") == DomainSettings()
    assert directory.is_local_address("x@OTHER.TEST")
    assert not directory.is_local_address("x@example.org")
    assert not directory.is_local_address("no-at-sign")


def test_input_section_is_not_modified():
    section = {"domains": ["EXAMPLE.test"], "users": [user("A@EXAMPLE.test")]}
    snapshot = json.loads(json.dumps(section))
    build(section)
    assert section == snapshot


def test_user_repr_hides_secrets():
    text = repr(User("a@example.test", password="hunter2", password_hash="$2b$secret"))
    assert "hunter2" not in text and "secret" not in text


def test_split_and_normalise():
    assert Directory.split("Local@EXAMPLE.test") == ("Local", "example.test")
    assert Directory.split('"a@b"@X.test') == ('"a@b"', "x.test")
    assert Directory.normalise("Local@EXAMPLE.test") == "local@example.test"
    with pytest.raises(ValueError):
        Directory.split("nobody")
    with pytest.raises(ValueError):
        Directory.normalise("nobody")


@pytest.mark.parametrize("address", [
    "a@example.test", "first.last+tag@sub.example.test", "a/b@example.test", "o'neil@x",
    '"quoted.local"@example.test', "a@[192.0.2.1]", "a@[IPv6:2001:db8::1]", "jörg@example.test",
])
def test_valid_addresses(address):
    assert Directory.is_valid_address(address)


@pytest.mark.parametrize("address", [
    "", "no-at-sign", "@example.test", "a@", "a b@example.test", "<a@example.test>",
    "a@exa mple.test", "a\x00@example.test", "a\t@example.test", ".a@example.test",
    "a..b@example.test", "a.@example.test", "a@-example.test", "a@example_test",
    "a@example..test", "a@[300.1.1.1]", "a@[IPv6:nope]", "a@b@example.test", "x" * 65 + "@e.test",
])
def test_invalid_addresses(address):
    assert not Directory.is_valid_address(address)


@pytest.mark.parametrize("local, safe", [
    ("alice", True), ("Alice.Smith+tag", True), ("a-b_c=d", True), ("x" * 64, True),
    ("", False), ("x" * 65, False), (".", False), ("..", False), (".hidden", False),
    ("a..b", False), ("../etc", False), ("a/b", False), ("a\\b", False), ('"q"', False),
    ("jörg", True), ("用户", True), ("ü" * 32, True), ("ü" * 33, False), ("a b", False),
    ("a\u2215b", False), ("a\uff0fb", False), ("a\u200db", False), ("jo\u0308rg", True),
    ("\u2603", False),
])
def test_is_safe_local_part(local, safe):
    assert Directory.is_safe_local_part(local) is safe


# -- rejections ---------------------------------------------------------------------------------

D = ["example.test"]


@pytest.mark.parametrize("section, pointer, fragment", [
    ({"domains": D, "users": [{"address": "a@example.test"}]},
     "/directory/users/0/password", "one of password or password_hash"),
    ({"domains": D, "users": [user("a@example.test", password_hash=BCRYPT_HASH)]},
     "/directory/users/0/password", "mutually exclusive"),
    ({"domains": D, "users": [{"address": "a@example.test", "password_hash": "$1$abc$def"}]},
     "/directory/users/0/password_hash", "argon2"),
    ({"domains": D, "users": [{"address": "a@example.test", "password_hash": "$argon2id$junk"}]},
     "/directory/users/0/password_hash", "malformed argon2"),
    ({"domains": D, "users": [{"address": "a@example.test", "password_hash": "$2b$04$short"}]},
     "/directory/users/0/password_hash", "malformed bcrypt"),
    ({"domains": D, "users": [user("a@example.test", password="")]},
     "/directory/users/0/password", "empty"),
    ({"domains": D, "users": [user("Bob@example.test"), user("bob@EXAMPLE.test")]},
     "/directory/users/1/address", "already defined at /directory/users/0/address"),
    ({"domains": D, "users": [user("bob@example.test")],
      "aliases": {"BOB@example.test": ["x@y.z"]}},
     "/directory/aliases/BOB@example.test", "already defined at /directory/users/0/address"),
    ({"domains": D, "aliases": {"x@example.test": ["a@b.c"]},
      "lists": {"X@example.test": ["d@e.f"]}},
     "/directory/lists/X@example.test", "already defined at /directory/aliases/x@example.test"),
    ({"domains": D, "users": [user("a b@example.test")]},
     "/directory/users/0/address", "invalid address"),
    ({"domains": D, "users": [user("<a@example.test>")]},
     "/directory/users/0/address", "invalid address"),
    ({"domains": D, "users": [user("a@example.test", send_as=["ok@x.y", "nope"])]},
     "/directory/users/0/send_as/1", "invalid address"),
    ({"domains": D, "aliases": {"not an address": ["a@b.c"]}},
     "/directory/aliases/not an address", "invalid address"),
    ({"domains": D, "aliases": {"x@example.test": ["a@b.c", "bad member"]}},
     "/directory/aliases/x@example.test/1", "invalid address"),
    ({"domains": D, "lists": {"x@example.test": []}},
     "/directory/lists/x@example.test", "at least one member"),
    ({"domains": D, "aliases": {"a/b~c@example.test": []}},
     "/directory/aliases/a~1b~0c@example.test", "at least one member"),
    ({"domains": D, "users": [user("a@elsewhere.test")]},
     "/directory/users/0/address", "not in a local domain"),
    ({"domains": D, "aliases": {"x@elsewhere.test": ["a@example.test"]}},
     "/directory/aliases/x@elsewhere.test", "not in a local domain"),
    ({"domains": D, "domain_settings": {"Other.Test": {"catch_all": True}}},
     "/directory/domain_settings/Other.Test", "not listed in domains"),
    ({"domains": D, "domain_settings": {"example.test": {}, "EXAMPLE.TEST": {}}},
     "/directory/domain_settings/EXAMPLE.TEST", "duplicate settings"),
    ({"domains": D, "domain_settings": {"example.test": {"catch_all": "yes"}}},
     "/directory/domain_settings/example.test/catch_all", "boolean"),
    ({"domains": ["a.test", "bad_domain!", "b.test"]}, "/directory/domains/1", "invalid domain"),
    ({"domains": ["a.test", "A.TEST"]}, "/directory/domains/1", "duplicate domain"),
    ({"domains": "example.test"}, "/directory/domains", "list"),
    ({"bogus": 1}, "/directory/bogus", "unknown field"),
    ({"domains": D, "users": [user("a@example.test", nick="x")]},
     "/directory/users/0/nick", "unknown field"),
    ({"domains": D, "domain_settings": {"example.test": {"relay": True}}},
     "/directory/domain_settings/example.test/relay", "unknown field"),
    ({"domains": D, "users": [{"password": "pw"}]}, "/directory/users/0/address", "required"),
])
def test_rejections(section, pointer, fragment):
    errors = errors_of(section)
    assert [p for p, _ in errors] == [pointer], errors
    assert fragment in errors[0][1]


def test_not_a_mapping():
    assert errors_of(["example.test"]) == [("/directory", "must be a table/mapping")]


def test_all_errors_are_collected():
    section = {
        "domains": ["example.test", "bad domain", "EXAMPLE.TEST"],
        "users": [
            {"address": "x y@example.test", "password": "a", "password_hash": BCRYPT_HASH},
            {"address": "ok@example.test"},
            user("OK@example.test"),
        ],
        "aliases": {"empty@example.test": []},
        "domain_settings": {"nowhere.test": {}},
        "bogus": True,
    }
    with pytest.raises(DirectoryError) as info:
        build(section)
    assert sorted(p for p, _ in info.value.errors) == sorted([
        "/directory/domains/1",
        "/directory/domains/2",
        "/directory/users/0/address",
        "/directory/users/0/password",
        "/directory/users/1/password",
        "/directory/users/2/address",
        "/directory/aliases/empty@example.test",
        "/directory/domain_settings/nowhere.test",
        "/directory/bogus",
    ])
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.errors)
    assert "/directory/bogus: unknown field" in lines


# -- external file ------------------------------------------------------------------------------

TOML_FILE = """
domains = ["Extra.TEST"]
[[users]]
address = "carol@extra.test"
password = "carol-pw"
[aliases]
"all@extra.test" = ["carol@extra.test", "alice@example.test"]
[domain_settings."extra.test"]
require_smtp_auth = true
"""

YAML_FILE = """
domains: [extra.test]
users:
  - address: Carol@extra.test
    password_hash: "{hash}"
lists:
  team@example.test: [alice@example.test, carol@extra.test]
"""


def test_external_toml_relative_to_base_dir(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "people.toml").write_text(TOML_FILE)
    directory = build({
        "domains": ["example.test"],
        "file": "conf.d/people.toml",
        "users": [user("alice@example.test")],
    }, tmp_path)
    assert directory.domains == frozenset({"example.test", "extra.test"})
    assert directory.user("alice@example.test") is not None
    assert directory.cram_md5_secret("CAROL@extra.test") == "carol-pw"
    assert directory.expand("all@extra.test") == ["carol@extra.test", "alice@example.test"]
    assert directory.domain_settings("extra.test").require_smtp_auth is True


def test_external_yaml_with_absolute_path(tmp_path):
    path = tmp_path / "people.yml"
    path.write_text(YAML_FILE.format(hash=BCRYPT_HASH))
    directory = build({"domains": ["example.test"], "file": str(path)}, Path("/elsewhere"))
    assert directory.user("carol@extra.test").password_hash == BCRYPT_HASH
    members = directory.alias_members("team@example.test")
    assert members == ("alice@example.test", "carol@extra.test")


def test_external_json(tmp_path):
    (tmp_path / "people.json").write_text(json.dumps({"users": [user("dan@example.test")]}))
    directory = build({"domains": ["example.test"], "file": "people.json"}, tmp_path)
    assert directory.user("dan@example.test") is not None


def test_external_domains_replace_the_localhost_default(tmp_path):
    (tmp_path / "d.yaml").write_text("domains: [localhost, extra.test]\n")
    assert build({"file": "d.yaml"}, tmp_path).domains == frozenset({"localhost", "extra.test"})
    (tmp_path / "e.yaml").write_text("users: []\n")
    assert build({"file": "e.yaml"}, tmp_path).domains == frozenset({"localhost"})


def test_duplicates_between_file_and_section_are_errors(tmp_path):
    path = tmp_path / "people.toml"
    path.write_text(TOML_FILE)
    errors = errors_of({
        "domains": ["example.test", "extra.test"],
        "file": "people.toml",
        "users": [user("Carol@Extra.test")],
        "domain_settings": {"extra.test": {}},
    }, tmp_path)
    assert [p for p, _ in errors] == ["/directory/file"] * 3
    messages = "\n".join(m for _, m in errors)
    assert f"/domains/0 in {path}: duplicate domain 'extra.test'" in messages
    assert "also at /directory/domains/1" in messages
    assert f"/users/0/address in {path}: 'carol@extra.test' is already defined at " \
           "/directory/users/0/address" in messages
    assert f"/domain_settings/extra.test in {path}: duplicate settings" in messages


def test_errors_inside_the_file_name_the_file_and_location(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("file: other.yaml\nusers:\n  - address: x@localhost\n")
    errors = errors_of({"file": "bad.yaml"}, tmp_path)
    assert sorted(errors) == sorted([
        ("/directory/file", f"/file in {path}: unknown field"),
        ("/directory/file", f"/users/0/password in {path}: one of password or password_hash "
                            "is required"),
    ])


@pytest.mark.parametrize("name, content, fragment", [
    ("missing.toml", None, "cannot read"),
    ("broken.toml", "domains = [", "cannot parse"),
    ("broken.yaml", "domains: [", "cannot parse"),
    ("broken.json", "{", "cannot parse"),
    ("list.json", "[1, 2]", "top level must be a table/mapping"),
    ("people.txt", "domains = []", "unsupported file type"),
])
def test_unusable_file(tmp_path, name, content, fragment):
    if content is not None:
        (tmp_path / name).write_text(content)
    [(pointer, message)] = errors_of({"file": name}, tmp_path)
    assert pointer == "/directory/file"
    assert str(tmp_path / name) in message and fragment in message
    assert "\n" not in message


# -- expansion and mailboxes --------------------------------------------------------------------


@pytest.fixture
def groups() -> Directory:
    return build({
        "domains": ["example.test", "catch.test"],
        "users": [user("Alice@example.test"), user("bob@example.test")],
        "aliases": {
            "sales@example.test": ["Alice@example.test", "team@example.test", "ext@far.test"],
            "loop-a@example.test": ["loop-b@example.test", "alice@example.test"],
            "loop-b@example.test": ["LOOP-A@example.test", "bob@example.test"],
            "self@example.test": ["self@example.test"],
        },
        "lists": {"team@example.test": ["bob@example.test", "ALICE@example.test", "x@far.test"]},
        "domain_settings": {"catch.test": {"catch_all": True}},
    })


def test_expand(groups):
    assert groups.expand("SALES@example.test") == [
        "alice@example.test", "bob@example.test", "x@far.test", "ext@far.test",
    ]
    assert groups.expand("team@example.test") == [
        "bob@example.test", "alice@example.test", "x@far.test",
    ]
    assert groups.expand("Bob@Example.TEST") == ["bob@example.test"]
    assert groups.expand("Someone@Far.Test") == ["someone@far.test"]
    with pytest.raises(ValueError):
        groups.expand("nobody")


def test_expand_terminates_on_loops(groups):
    assert groups.expand("loop-a@example.test") == ["bob@example.test", "alice@example.test"]
    assert groups.expand("loop-b@example.test") == ["alice@example.test", "bob@example.test"]
    assert groups.expand("self@example.test") == []


def test_alias_members_are_direct(groups):
    assert groups.alias_members("sales@example.test") == (
        "Alice@example.test", "team@example.test", "ext@far.test",
    )
    assert groups.alias_members("bob@example.test") is None
    assert groups.alias_members("nobody") is None


@pytest.mark.parametrize("address, exists", [
    ("alice@example.test", True), ("ALICE@EXAMPLE.TEST", True), ("sales@example.test", True),
    ("team@example.test", True), ("nobody@example.test", False), ("alice@far.test", False),
    ("anything@catch.test", True), ("Any.Thing+x@CATCH.test", True),
    ("../etc@catch.test", False), ("a/b@catch.test", False), ("@catch.test", False),
    (".hidden@catch.test", False), ("catch.test", False), ("", False),
])
def test_mailbox_exists(groups, address, exists):
    assert groups.mailbox_exists(address) is exists


def test_aliases_and_lists_are_not_users(groups):
    assert groups.user("sales@example.test") is None
    assert groups.user("team@example.test") is None
    assert groups.user("nobody") is None


# -- passwords ----------------------------------------------------------------------------------


@pytest.fixture
def accounts() -> Directory:
    return build({
        "domains": ["example.test"],
        "users": [
            user("plain@example.test", password="plain-pw"),
            {"address": "argon@example.test", "password_hash": FAST_ARGON2.hash("argon-pw")},
            {"address": "bcrypt@example.test", "password_hash": BCRYPT_HASH},
            {"address": "twoy@example.test", "password_hash": "$2y$" + BCRYPT_HASH[4:]},
        ],
    })


@pytest.mark.parametrize("address, password, ok", [
    ("plain@example.test", "plain-pw", True),
    ("PLAIN@Example.Test", "plain-pw", True),
    ("plain@example.test", "Plain-pw", False),
    ("plain@example.test", "", False),
    ("argon@example.test", "argon-pw", True),
    ("argon@example.test", "wrong", False),
    ("bcrypt@example.test", "bcrypt-pw", True),
    ("bcrypt@example.test", "bcrypt-pw" * 20, False),
    ("bcrypt@example.test", "wrong", False),
    ("twoy@example.test", "bcrypt-pw", True),
    ("unknown@example.test", "plain-pw", False),
    ("unknown@example.test", "", False),
    ("not-an-address", "plain-pw", False),
])
def test_verify_password(accounts, address, password, ok):
    assert accounts.verify_password(address, password) is ok


def test_every_verification_costs_one_hash_check(accounts, monkeypatch):
    checked: list[str] = []
    real = directory_module._check_hash

    def counting(password_hash: str, password: str) -> bool:
        checked.append(password_hash)
        return real(password_hash, password)

    monkeypatch.setattr(directory_module, "_check_hash", counting)
    for address in ("plain@example.test", "argon@example.test", "bcrypt@example.test",
                    "unknown@example.test", "junk"):
        checked.clear()
        accounts.verify_password(address, "guess")
        assert len(checked) == 1, address
    accounts.verify_password("unknown@example.test", "guess")
    assert checked[-1].startswith("$argon2id$")  # the dummy hash


def test_cram_md5_secret_and_plaintext_flag(accounts):
    assert accounts.has_plaintext_passwords is True
    assert accounts.cram_md5_secret("Plain@example.test") == "plain-pw"
    assert accounts.cram_md5_secret("argon@example.test") is None
    assert accounts.cram_md5_secret("bcrypt@example.test") is None
    assert accounts.cram_md5_secret("unknown@example.test") is None
    hashed_only = build({"domains": D, "users": [{"address": "a@example.test",
                                                  "password_hash": BCRYPT_HASH}]})
    assert hashed_only.has_plaintext_passwords is False
