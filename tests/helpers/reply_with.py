"""A test plugin: ``XREPLY <code> <enhanced> <text>`` is answered with exactly that reply, so
tests can produce replies (530, 538, 551...) whose builtin plugins are not in play."""

from ingress import Reply, hookimpl

NAME = "reply_with"


@hookimpl
def on_command(verb, arg):
    if verb != "XREPLY":
        return None
    code, enhanced, text = arg.split(" ", 2)
    return Reply(int(code), enhanced, text)
