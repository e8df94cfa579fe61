"""Who is local: domains, users, aliases and mailing lists.

The directory is built from the ``[directory]`` config section, optionally merged with an
external TOML/YAML/JSON file, and answers the questions the SMTP layer asks: is this domain
local, does this mailbox exist, what does this alias expand to, is this password right.

Public API: plugin authors may import Directory and User (and DomainSettings, DirectoryError).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import re
import secrets
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import cerberus

from ingress import addresses
from ingress.errors import pointer
from ingress.files import FileError, read_file

__all__ = ["Directory", "DirectoryError", "DomainSettings", "User"]

_HASHER = argon2.PasswordHasher()
_BCRYPT_RE = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", re.ASCII)
UNSAFE_LOCAL_PART = f"the local part is not a safe folder name ({addresses.SAFE_LOCAL_PART})"


class DirectoryError(ValueError):
    """The directory config is invalid; ``errors`` lists every ``(json_pointer, message)``."""

    def __init__(self, errors: Iterable[tuple[str, str]]) -> None:
        self.errors: list[tuple[str, str]] = list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(f"{pointer}: {message}" for pointer, message in self.errors)


@dataclass(frozen=True)
class User:
    """A local user. ``address`` keeps the configured local-part case (in NFC); the domain is in
    its lower-case A-label form."""

    address: str
    name: str = ""
    password: str | None = field(default=None, repr=False)
    password_hash: str | None = field(default=None, repr=False)
    send_as: tuple[str, ...] = ()


@dataclass(frozen=True)
class DomainSettings:
    """Per-domain settings from ``[directory.domain_settings."<domain>"]``."""

    require_smtp_auth: bool = False
    catch_all: bool = False
    catch_all_max_mailboxes: int = 1000


def _is_valid_domain(domain: str) -> bool:
    return addresses.valid_domain(domain)


def _password_hash_problem(value: str) -> str | None:
    if value.startswith(("$argon2id$", "$argon2i$")):
        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            return "malformed argon2 hash"
        return None
    if value.startswith(("$2b$", "$2a$", "$2y$")):
        return None if _BCRYPT_RE.fullmatch(value) else "malformed bcrypt hash"
    return "must be an argon2id/argon2i ($argon2id$...) or bcrypt ($2b$...) hash"


def _normalised_form(value: Any) -> Any:
    """How the directory keeps a valid address: the local part in NFC (its case kept), the
    domain as lower-case A-labels. Anything else is left as it is, for its error message."""
    if not isinstance(value, str) or not addresses.valid_address(value):
        return value
    local, domain = addresses.split(value)
    return f"{unicodedata.normalize('NFC', local)}@{domain}"


class _Validator(cerberus.Validator):
    """Adds the coercions and checks the schema below refers to by name."""

    def _normalize_coerce_domain(self, value: Any) -> Any:
        return addresses.domain_key(value) if isinstance(value, str) else value

    def _normalize_coerce_address(self, value: Any) -> Any:
        return _normalised_form(value)

    def _check_with_domain(self, field: Any, value: Any) -> None:
        if isinstance(value, str) and not _is_valid_domain(value):
            self._error(field, f"invalid domain {value!r} (not a host name: LDH labels, "
                        "A-labels or IDNA 2008 U-labels)")

    def _check_with_address(self, field: Any, value: Any) -> None:
        if isinstance(value, str) and not Directory.is_valid_address(value):
            self._error(field, f"invalid address {value!r}")

    def _check_with_not_boolean(self, field: Any, value: Any) -> None:
        if isinstance(value, bool):
            self._error(field, "must be of integer type")

    def _check_with_members(self, field: Any, value: Any) -> None:
        if isinstance(value, list) and not value:
            self._error(field, "needs at least one member")

    def _check_with_password_hash(self, field: Any, value: Any) -> None:
        problem = _password_hash_problem(value) if isinstance(value, str) else None
        if problem:
            self._error(field, problem)


_ADDRESS = {"type": "string", "coerce": "address", "check_with": "address"}
_GROUP = {
    "type": "dict",
    "default": {},
    "keysrules": {"type": "string"},
    "valuesrules": {"type": "list", "check_with": "members", "schema": _ADDRESS},
}
_FILE_SCHEMA: dict[str, Any] = {
    "domains": {
        "type": "list",
        "default": [],
        "schema": {"type": "string", "coerce": "domain", "check_with": "domain"},
    },
    "users": {
        "type": "list",
        "default": [],
        "schema": {
            "type": "dict",
            "schema": {
                "address": {**_ADDRESS, "required": True},
                "password": {"type": "string", "empty": False},
                "password_hash": {"type": "string", "check_with": "password_hash"},
                "name": {"type": "string", "default": ""},
                "send_as": {"type": "list", "default": [], "schema": _ADDRESS},
            },
        },
    },
    "aliases": _GROUP,
    "lists": _GROUP,
    "domain_settings": {
        "type": "dict",
        "default": {},
        "keysrules": {"type": "string"},
        "valuesrules": {
            "type": "dict",
            "schema": {
                "require_smtp_auth": {"type": "boolean", "default": False},
                "catch_all": {"type": "boolean", "default": False},
                "catch_all_max_mailboxes": {"type": "integer", "min": 1, "default": 1000,
                                            "check_with": "not_boolean"},
            },
        },
    },
}
_SECTION_SCHEMA: dict[str, Any] = {
    **_FILE_SCHEMA,
    "domains": {**_FILE_SCHEMA["domains"], "default": ["localhost"]},
    "file": {"type": "string", "default": ""},
}


@dataclass(frozen=True)
class _Origin:
    """Where a document came from: the config section itself, or the external file."""

    file: Path | None = None

    def where(self, path: tuple[Any, ...]) -> str:
        if self.file is None:
            return "/directory" + pointer(path)
        return f"{pointer(path) or '/'} in {self.file}"

    def error(self, path: tuple[Any, ...], message: str) -> tuple[str, str]:
        if self.file is None:
            return "/directory" + pointer(path), message
        return "/directory/file", f"{self.where(path)}: {message}"


# A validated document: its origin, its normalised content, and the (field,) / (field, key)
# prefixes cerberus rejected, which the cross-entry checks skip so one mistake is reported once.
_Source = tuple[_Origin, dict[str, Any], set[tuple[Any, ...]]]


def _flatten(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """Turn cerberus' nested error dict into ``(path, message)`` pairs."""
    if isinstance(tree, Mapping):
        for key, sub in tree.items():
            yield from _flatten(sub, (*path, key))
    elif isinstance(tree, list):
        for item in tree:
            yield from _flatten(item, path)
    else:
        yield path, str(tree)


def _validate(document: Mapping[str, Any], schema: dict[str, Any], origin: _Origin,
              errors: list[tuple[str, str]]) -> _Source:
    validator = _Validator(schema)
    if validator.validate(copy.deepcopy(dict(document))):
        return origin, validator.document, set()
    rejected = set()
    for path, message in _flatten(validator.errors):
        errors.append(origin.error(path, message))
        rejected.add(path[:2])
    return origin, validator.document or {}, rejected


def _entries(source: _Source, name: str) -> Iterator[tuple[Any, Any]]:
    """(index or key, value) of one list/dict field, skipping what cerberus rejected."""
    _, document, rejected = source
    value = document.get(name)
    if (name,) in rejected or not isinstance(value, (list, dict)):
        return
    items = value.items() if isinstance(value, dict) else enumerate(value)
    yield from ((key, item) for key, item in items if (name, key) not in rejected)


def _load_file(path: Path, errors: list[tuple[str, str]]) -> Mapping[str, Any] | None:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        errors.append(("/directory/file", f"{path}: unsupported file type (not .toml/.yaml/.json)"))
        return None
    try:
        data = read_file(path)
    except FileError as exc:
        errors.extend(("/directory/file", f"{where} in {path}: {message}" if where else
                       f"{path}: {message}") for where, message in exc.problems)
        return None
    if data is None:  # an empty YAML file
        data = {}
    if not isinstance(data, Mapping):
        errors.append(("/directory/file", f"{path}: top level must be a table/mapping"))
        return None
    return data


# For directories without any stored hash: the dummy check only has to cost what a known
# plaintext user's check costs, which is this same dummy check.
_LIGHT_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=8192, parallelism=1)


def _dummy_hash(hashes: Iterable[str]) -> str:
    """A hash of a random secret made like the directory's own hashes (argon2 parameters or
    bcrypt cost of the first one found), so that checking it costs what checking a real one
    costs."""
    secret = secrets.token_urlsafe(32)
    for stored in hashes:
        if stored.startswith("$argon2"):
            params = argon2.extract_parameters(stored)
            return argon2.PasswordHasher.from_parameters(params).hash(secret)
        if stored.startswith("$2"):
            rounds = int(stored.split("$")[2])
            return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds)).decode()
    return _LIGHT_HASHER.hash(secret)


def _check_hash(password_hash: str, password: str) -> bool:
    """The one slow hash verification a verify_password call performs."""
    try:
        if password_hash.startswith("$argon2"):
            return _HASHER.verify(password_hash, password)
        # bcrypt ignores bytes past 72; bcrypt>=5 raises instead, so truncate like it used to.
        candidate = password.encode("utf-8", "surrogatepass")[:72]
        return bcrypt.checkpw(candidate, password_hash.encode("ascii"))
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError):
        return False


class Directory:
    """The set of local domains, users, aliases and lists; immutable once built."""

    def __init__(self, *, domains: Iterable[str], users: Iterable[User] = (),
                 aliases: Mapping[str, Iterable[str]] | None = None,
                 lists: Mapping[str, Iterable[str]] | None = None,
                 domain_settings: Mapping[str, DomainSettings] | None = None) -> None:
        """Build from already validated parts; :meth:`from_config` is the usual way in."""
        self.domains: frozenset[str] = frozenset(map(addresses.domain_key, domains))
        self._users = {self.normalise(u.address): u for u in users}
        self._aliases = {self.normalise(k): tuple(v) for k, v in (aliases or {}).items()}
        self._lists = {self.normalise(k): tuple(v) for k, v in (lists or {}).items()}
        self._settings = {addresses.domain_key(k): v for k, v in (domain_settings or {}).items()}
        self.has_plaintext_passwords: bool = any(
            u.password is not None for u in self._users.values()
        )

    @classmethod
    def from_config(cls, section: Mapping[str, Any], base_dir: Path | str) -> Directory:
        """Validate and normalise the ``[directory]`` section (plus its ``file``).

        ``base_dir`` anchors a relative ``file``. Raises :class:`DirectoryError` listing
        every problem found.
        """
        if not isinstance(section, Mapping):
            raise DirectoryError([("/directory", "must be a table/mapping")])
        errors: list[tuple[str, str]] = []
        sources = [_validate(section, _SECTION_SCHEMA, _Origin(), errors)]
        main_doc = sources[0][1]
        file_name = main_doc.get("file")
        if isinstance(file_name, str) and file_name and ("file",) not in sources[0][2]:
            path = Path(base_dir) / file_name  # an absolute file_name replaces base_dir
            loaded = _load_file(path, errors)
            if loaded is not None:
                # The "localhost" default only applies when nobody lists domains.
                if "domains" not in section and "domains" in loaded:
                    main_doc["domains"] = []
                sources.append(_validate(loaded, _FILE_SCHEMA, _Origin(path), errors))
        directory = cls._build(sources, errors)
        if errors:
            raise DirectoryError(errors)
        return directory

    @classmethod
    def _build(cls, sources: list[_Source], errors: list[tuple[str, str]]) -> Directory:
        """Merge the validated sources, checking everything that spans entries."""
        domains: dict[str, str] = {}  # domain -> where it was defined
        for source in sources:
            for index, domain in _entries(source, "domains"):
                if domain in domains:
                    message = f"duplicate domain {domain!r} (also at {domains[domain]})"
                    errors.append(source[0].error(("domains", index), message))
                else:
                    domains[domain] = source[0].where(("domains", index))

        settings: dict[str, DomainSettings] = {}
        for source in sources:
            for key, value in _entries(source, "domain_settings"):
                domain, path = addresses.domain_key(key), ("domain_settings", key)
                if domain not in domains:
                    errors.append(source[0].error(path, f"{domain!r} is not listed in domains"))
                elif domain in settings:
                    errors.append(source[0].error(path, f"duplicate settings for {domain!r}"))
                else:
                    settings[domain] = DomainSettings(**value)

        claimed: dict[str, str] = {}  # normalised address -> where it was defined

        def unsafe(origin: _Origin, path: tuple[Any, ...], address: str) -> bool:
            """A local address whose local part could not be a Maildir folder (it would
            escape the Maildir or nest folders): an error."""
            local, domain = cls.split(address)
            if domain not in domains or cls.is_safe_local_part(local):
                return False
            errors.append(origin.error(path, f"{address!r}: {UNSAFE_LOCAL_PART}"))
            return True

        def claim(origin: _Origin, path: tuple[Any, ...], address: str) -> bool:
            if not cls.is_valid_address(address):
                errors.append(origin.error(path, f"invalid address {address!r}"))
                return False
            key = cls.normalise(address)
            if cls.split(address)[1] not in domains:
                errors.append(origin.error(path, f"{address!r} is not in a local domain"))
            elif unsafe(origin, path, address):
                return False
            elif key in claimed:
                message = f"{address!r} is already defined at {claimed[key]}"
                errors.append(origin.error(path, message))
            else:
                claimed[key] = origin.where(path)
                return True
            return False

        users: list[User] = []
        for origin, document, rejected in sources:
            entries = document.get("users")
            if ("users",) in rejected or not isinstance(entries, list):
                continue
            for index, entry in enumerate(entries):
                path = ("users", index)
                if not isinstance(entry, dict):
                    continue
                # Checked even on entries cerberus rejected, so that all their errors show.
                if ("password" in entry) == ("password_hash" in entry):
                    message = ("password and password_hash are mutually exclusive"
                               if "password" in entry
                               else "one of password or password_hash is required")
                    errors.append(origin.error((*path, "password"), message))
                if path not in rejected and claim(origin, (*path, "address"), entry["address"]):
                    users.append(User(
                        address=entry["address"],
                        name=entry["name"],
                        password=entry.get("password"),
                        password_hash=entry.get("password_hash"),
                        send_as=tuple(entry["send_as"]),
                    ))

        groups: dict[str, dict[str, list[str]]] = {"aliases": {}, "lists": {}}
        for kind, found in groups.items():
            for source in sources:
                for key, members in _entries(source, kind):
                    bad = [unsafe(source[0], (kind, key, i), m) for i, m in enumerate(members)]
                    if claim(source[0], (kind, key), key) and not any(bad):
                        found[key] = members
        return cls(domains=domains, users=users, aliases=groups["aliases"],
                   lists=groups["lists"], domain_settings=settings)

    # -- addresses --------------------------------------------------------------------------

    @staticmethod
    def split(address: str) -> tuple[str, str]:
        """``(local part as given, domain as compared)``: the domain in its lower-case A-label
        form (``Bücher.example`` -> ``xn--bcher-kva.example``); ValueError when there is no
        ``@``."""
        return addresses.split(address)

    @staticmethod
    def normalise(address: str) -> str:
        """The comparison key: ``"Local@EXAMPLE.test"`` -> ``"local@example.test"``; a UTF-8
        local part in NFC, lower-cased; the domain as lower-case A-labels."""
        return addresses.normalise(address)

    @staticmethod
    def mailbox(address: str) -> tuple[str, str]:
        """``(domain, folder)`` of a local address's Maildir: the A-label domain and the
        comparison form of the local part (NFC, lower-cased)."""
        local, domain = addresses.split(address)
        return domain, addresses.local_key(local)

    @staticmethod
    def is_valid_address(address: str) -> bool:
        """``local@domain`` with a dot-atom or quoted local part (UTF-8 allowed, RFC 6531) and a
        host name (A-labels or U-labels) or ``[address literal]`` domain; no whitespace outside
        quotes, no control characters, no angle brackets. The rules the SMTP dialogue uses
        (:mod:`ingress.addresses`)."""
        return addresses.valid_address(address)

    @staticmethod
    def is_safe_local_part(local: str) -> bool:
        """Whether ``local`` is safe as a single Maildir directory name. The one rule for
        catch-all local parts, for every local address in the directory (checked when the
        config is loaded) and for the Maildir writer itself (see
        :func:`ingress.addresses.is_safe_local_part`)."""
        return addresses.is_safe_local_part(local)

    # -- lookups ----------------------------------------------------------------------------

    def _key(self, address: str) -> str | None:
        try:
            return self.normalise(address)
        except ValueError:
            return None

    def is_local_domain(self, domain: str) -> bool:
        """Whether mail for ``domain`` is ours (case-insensitive)."""
        return addresses.domain_key(domain) in self.domains

    def is_local_address(self, address: str) -> bool:
        """Whether the domain part of ``address`` is local (the mailbox may still not exist)."""
        return "@" in address and self.split(address)[1] in self.domains

    def user(self, address: str) -> User | None:
        """The user with this address, or None (aliases and lists are not users)."""
        return self._users.get(self._key(address) or "")

    def domain_settings(self, domain: str) -> DomainSettings:
        """Settings for ``domain``; the defaults when it has none configured."""
        return self._settings.get(addresses.domain_key(domain), DomainSettings())

    def alias_members(self, address: str) -> tuple[str, ...] | None:
        """Direct members (as configured) of an alias or list, or None if it is neither."""
        key = self._key(address) or ""
        return self._aliases.get(key, self._lists.get(key))

    def expand(self, address: str) -> list[str]:
        """Final recipients of ``address``, as normalised addresses.

        Aliases and lists are expanded recursively, depth first, in configured order. Each
        address appears once; a group already expanded is skipped, so loops terminate. An
        address that is not an alias/list expands to itself. ValueError when there is no ``@``.
        """
        result: list[str] = []
        seen: set[str] = set()
        expanded: set[str] = set()
        stack = [self.normalise(address)]
        while stack:
            key = self.normalise(stack.pop())
            members = self._aliases.get(key, self._lists.get(key))
            if members is None:
                if key not in seen:
                    seen.add(key)
                    result.append(key)
            elif key not in expanded:
                expanded.add(key)
                stack.extend(reversed(members))
        return result

    def is_configured(self, address: str) -> bool:
        """Whether ``address`` is a user, an alias or a list (not merely a catch-all name)."""
        key = self._key(address)
        return key is not None and (key in self._users or key in self._aliases
                                    or key in self._lists)

    def mailbox_exists(self, address: str) -> bool:
        """Whether RCPT TO this address should be accepted as local: a user, an alias, a list,
        or any safe local part (see :meth:`is_safe_local_part`) in a ``catch_all`` domain."""
        key = self._key(address)
        if key is None:
            return False
        if key in self._users or key in self._aliases or key in self._lists:
            return True
        local, domain = self.split(address)
        return (domain in self.domains and self.domain_settings(domain).catch_all
                and self.is_safe_local_part(local))

    # -- authentication ---------------------------------------------------------------------

    def verify_password(self, address: str, password: str) -> bool:
        """Check ``password`` for the user ``address``.

        To give no timing oracle, every call costs the same: exactly one slow hash check (the
        user's own argon2/bcrypt hash if it has one, else a dummy hash made like the directory's
        own hashes) plus one constant-time comparison of SHA-256 digests of the
        UTF-8 plaintexts (against an empty string when the user has no plaintext password).
        Unknown users and malformed addresses simply fail.
        """
        user = self.user(address)
        stored = user.password if user is not None and user.password is not None else ""
        plaintext_ok = hmac.compare_digest(
            hashlib.sha256(stored.encode("utf-8", "surrogatepass")).digest(),
            hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest(),
        )
        if user is not None and user.password_hash is not None:
            return _check_hash(user.password_hash, password)
        _check_hash(self._dummy, password)
        return user is not None and user.password is not None and plaintext_ok

    @functools.cached_property
    def _dummy(self) -> str:
        # Made at the first check, not at start: an argon2 hash may cost 64 MiB for a moment.
        return _dummy_hash(u.password_hash for u in self._users.values() if u.password_hash)

    def cram_md5_secret(self, address: str) -> str | None:
        """The plaintext password CRAM-MD5 needs, or None (unknown or hash-only user)."""
        user = self.user(address)
        return user.password if user is not None else None
