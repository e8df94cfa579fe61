"""max_bad_commands: close the session after `limit` bad commands (421 4.7.0 Too many errors).

Counted from the replies: 500 (unknown verb, line too long), 501 (syntax), 503 (bad sequence),
504 (unknown AUTH mechanism) and 535 (failed AUTH). Policy refusals (502, 530, 538, 550-555)
are not the client's mistakes and do not count. RSET does not reset the count, nor does STARTTLS.
"""

from __future__ import annotations

import ingress_schemas
from ingress import Reply, hookimpl

COUNTED = frozenset({500, 501, 503, 504, 535})
COUNTER = "bad_commands"


@hookimpl
def config_schema():
    return ingress_schemas.load("max_bad_commands")


@hookimpl
def on_reply(session, reply, settings):
    if reply.code not in COUNTED:
        return None
    session.counters[COUNTER] += 1
    limit = settings["limit"]
    if limit and session.counters[COUNTER] >= limit:
        return Reply(421, "4.7.0", "Too many errors", close=True)
    return None
