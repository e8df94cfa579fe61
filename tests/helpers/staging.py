"""Not a plugin: what the delivery tests stage through ``maildir.Commit`` (a small message
and a stager for one mailbox of ``example.test``), and the mark of tests that need syncfs."""

import pytest

from ingress.delivery import maildir

needs_syncfs = pytest.mark.skipif(not maildir.FILE_SYSTEM_FLUSH,
                                  reason="syncfs reports all write-back errors from Linux 5.17")


class Body:
    def __init__(self, text: str):
        self.data = f"Subject: {text}\r\n\r\nbody\r\n".encode()

    def getvalue(self) -> bytes:
        return self.data


def stager(root, local: str, text: str, batch: bool = True):
    """Stage a message with subject *text* for ``local@example.test`` under *root*."""
    def run(commit):
        finals, folders = maildir.stage(commit, root, [("example.test", local)], b"", Body(text),
                                        "mx", batch=batch)
        return finals, finals, folders
    return run
