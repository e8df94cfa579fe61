"""Accepting connections: out of file descriptors, the server pauses accepting, keeps serving
the sessions it has, and takes the clients waiting in the backlog once descriptors are free."""

from __future__ import annotations

import importlib.util
import os
import resource
import socket

import pytest

from ingress.testing import eventually

LOOPS = [pytest.param(("--no-uvloop",), id="asyncio"),
         pytest.param((), id="uvloop", marks=pytest.mark.skipif(
             importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"))]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def greeted(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(100).startswith(b"220 ")
    except (TimeoutError, socket.timeout):
        return False


@pytest.mark.parametrize("args", LOOPS)
def test_out_of_file_descriptors_pauses_accepting_then_serves_who_waited(ingress_server, args):
    server = ingress_server(args=args)
    pid = server.process.pid
    spare = 5
    limit = open_fds(pid) + spare
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    first = [socket.create_connection((server.host, server.port)) for _ in range(spare)]
    try:
        assert all(greeted(s, 10) for s in first)
        waiting = [socket.create_connection((server.host, server.port)) for _ in range(3)]
        assert not any(greeted(s, 0.5) for s in waiting), "accepted past the limit"
        eventually(lambda: "cannot accept connections" in server.log(), what="the log line")
        first[0].sendall(b"NOOP\r\n")  # the sessions it has are still served
        assert first[0].recv(100).startswith(b"250 ")
        for sock in first[1:4]:
            sock.sendall(b"QUIT\r\n")
            sock.recv(100)
            sock.close()
        assert all(greeted(s, 10) for s in waiting), "the waiting clients were not served"
        for sock in waiting:
            sock.close()
    finally:
        for sock in first:
            sock.close()
    assert server.stop() == 0
