"""The relay queue: ``<id>.eml`` plus ``<id>.json`` envelope (blocking). Private to the core."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from ingress.delivery.maildir import Commit


def envelope(session, transaction, recipients, generated: bool = False) -> dict:
    """The ``.json`` of a queue entry (described by schemas/envelope.json). ``mail_params`` and
    each recipient's ``params`` are the MAIL/RCPT parameters as the client gave them (keys
    upper-cased; values raw, xtext still encoded, as a relay passes them on), see
    docs/plugins/dsn.md. *generated*: written by this server (a DSN): there is no client."""
    client = not generated
    return {
        "id": transaction.id,
        "mail_from": transaction.mail_from,
        "mail_params": transaction.mail_params,
        "recipients": [{"address": r.address, "params": r.params} for r in recipients],
        "client_ip": session.peer_ip if client else None,
        "client_port": session.peer_port if client else None,
        "helo": session.helo if client else None,
        "protocol": session.protocol if client else "local",
        "auth_user": session.auth_user if client else None,
        "generated": generated,
        "received_at": datetime.fromtimestamp(transaction.started, timezone.utc).isoformat(),
        "queued_at": datetime.now(timezone.utc).isoformat(),
        "smtputf8": "SMTPUTF8" in transaction.mail_params,
        "quarantine": transaction.quarantined,
    }


def dumps(env: dict) -> str:
    """The exact text of ``<id>.json`` (also what other delivery backends pass on)."""
    return json.dumps(env, indent=1, sort_keys=True)


def stage(commit: Commit, root: Path, queue_id: str, header: bytes, message, env: dict,
          batch: bool = True) -> list[str]:
    """Write the entry's ``.eml`` and ``.json`` in ``tmp/`` through *commit*; once their data
    is durable they are renamed into place, the ``.json`` last (its presence marks a complete
    entry). The final paths; the caller makes the entries in *root* durable
    (``maildir.Group`` does)."""
    tmpdir = root / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    eml_tmp, json_tmp = str(tmpdir / f"{queue_id}.eml"), str(tmpdir / f"{queue_id}.json")
    eml, meta = str(root / f"{queue_id}.eml"), str(root / f"{queue_id}.json")
    commit.write(eml_tmp, header, message, batch=batch)
    commit.write(json_tmp, dumps(env).encode(), batch=batch)

    def publish() -> None:
        os.rename(eml_tmp, eml)
        os.rename(json_tmp, meta)

    commit.publish(publish)
    return [eml, meta]


def remove_leftovers(root: Path) -> tuple[int, int]:
    """At start, before serving: remove the files in ``root/tmp/`` (entries being written when
    the server stopped) and every ``<id>.eml`` without its ``<id>.json`` (a crash between the two
    renames; never acknowledged). Return both counts."""
    temporary = incomplete = 0
    tmpdir = root / "tmp"
    if tmpdir.is_dir():
        for path in tmpdir.iterdir():
            if not path.is_dir():
                path.unlink(missing_ok=True)
                temporary += 1
    if root.is_dir():
        for eml in root.glob("*.eml"):
            if not eml.with_suffix(".json").exists():
                eml.unlink(missing_ok=True)
                incomplete += 1
    return temporary, incomplete
