"""This process's id, kept current across ``fork`` (worker processes) without a ``getpid``
system call each time it is needed: in queue ids, Maildir file names and log lines."""

from __future__ import annotations

import os

pid = os.getpid()


def _forked() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
