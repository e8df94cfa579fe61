"""banner: the greeting text, with #HostName#, #ConnectedIP#, #Time#, #TimeUTC#, #UnixTime#."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from email.utils import format_datetime

import ingress_schemas
from ingress import hookimpl


@hookimpl
def config_schema():
    return ingress_schemas.load("banner")


_MACROS = {
    "#HostName#": lambda session, now: session.hostname,
    "#ConnectedIP#": lambda session, now: session.peer_ip,
    "#Time#": lambda session, now: format_datetime(datetime.fromtimestamp(now).astimezone()),
    "#TimeUTC#": lambda session, now: format_datetime(datetime.fromtimestamp(now, timezone.utc)),
    "#UnixTime#": lambda session, now: str(int(now)),
}
_MACRO = re.compile("|".join(map(re.escape, _MACROS)))


def expand(text: str, session) -> str:
    # Runs for every connection: only the macros present in the text are computed.
    if "#" not in text:
        return text
    now = time.time()
    return _MACRO.sub(lambda m: _MACROS[m.group(0)](session, now), text)


@hookimpl
def greeting(session, settings):
    # Reply.wire() turns any control character into a space, so no CR/LF can be injected.
    return expand(settings["text"], session)
