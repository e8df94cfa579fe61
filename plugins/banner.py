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


def expand(text: str, session) -> str:
    now = time.time()
    values = {
        "#HostName#": session.hostname,
        "#ConnectedIP#": session.peer_ip,
        "#Time#": format_datetime(datetime.fromtimestamp(now).astimezone()),
        "#TimeUTC#": format_datetime(datetime.fromtimestamp(now, timezone.utc)),
        "#UnixTime#": str(int(now)),
    }
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], text)


@hookimpl
def greeting(session, settings):
    # Reply.wire() turns any control character into a space, so no CR/LF can be injected.
    return expand(settings["text"], session)
