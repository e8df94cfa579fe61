"""A test plugin that makes the builtin Maildir delivery slow, like a stalled disk: each
message's write waits ``seconds`` in the delivery thread before it starts."""

import time

from ingress import hookimpl
from ingress.delivery import maildir

NAME = "slow_disk"


@hookimpl
def config_schema():
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {"seconds": {"type": "number", "minimum": 0, "default": 1.0}},
    }


@hookimpl
def startup(settings):
    real_stage = maildir.stage

    def slow_stage(*args, **kwargs):
        time.sleep(settings["seconds"])
        return real_stage(*args, **kwargs)

    maildir.stage = slow_stage
