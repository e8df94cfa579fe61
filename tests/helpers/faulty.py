"""A third-party plugin that fails in the ways a real one might: it raises, it hangs, it
returns nonsense. The server must fail closed with 451 4.3.0 and stay up."""

import asyncio

from ingress import hookimpl

NAME = "faulty"


@hookimpl
async def on_rcpt(recipient):
    local = recipient.address.split("@")[0]
    if local == "raise":
        raise RuntimeError("plugin bug")
    if local == "hang":
        await asyncio.sleep(3600)
    if local == "nonsense":
        return "not a Reply"
    return None


@hookimpl(tryfirst=True)
def deliver(transaction):
    if transaction.mail_from == "crash@example.org":
        raise OSError("backend down")
    if transaction.mail_from == "hang@example.org":
        return asyncio.sleep(3600)  # a backend that never answers
