"""A test plugin that advertises a message size limit of its own in EHLO, ``SIZE 1000``, as a
storage backend with a smaller limit than ``max_message_size`` does."""

from ingress import hookimpl

NAME = "size_limit"


@hookimpl
def ehlo_keywords():
    return ["SIZE 1000"]
