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
    except TimeoutError:
        return False


@pytest.mark.parametrize("args", LOOPS)
def test_out_of_file_descriptors_pauses_accepting_then_serves_who_waited(ingress_server, args):
    server = ingress_server(args=args)
    with server.smtp() as client:  # lazy imports and the like open their files now
        client.noop()
    pid = server.process.pid
    limit = open_fds(pid) + 5
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    held: list[socket.socket] = []
    waiting: list[socket.socket] = []
    try:
        for _ in range(20):  # connect until one is not greeted: the server is out of descriptors
            sock = socket.create_connection((server.host, server.port))
            (held if greeted(sock, 2) else waiting).append(sock)
            if waiting:
                break
        assert waiting, "never ran out of file descriptors"
        waiting += [socket.create_connection((server.host, server.port)) for _ in range(2)]
        assert not any(greeted(s, 0.5) for s in waiting[1:]), "accepted past the limit"
        eventually(lambda: "cannot accept connections" in server.log(), what="the log line")
        held[0].sendall(b"NOOP\r\n")  # the sessions it has are still served
        assert held[0].recv(100).startswith(b"250 ")
        for sock in held[-3:]:
            sock.sendall(b"QUIT\r\n")
            sock.recv(100)
            sock.close()
        assert all(greeted(s, 10) for s in waiting), "the waiting clients were not served"
    finally:
        for sock in held + waiting:
            sock.close()
    assert server.stop() == 0


def test_listening_on_all_interfaces_skips_an_address_family_the_host_lacks(monkeypatch):
    from ingress.server import bind_socket

    real = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    sockets = bind_socket("", 0, reuse_port=False)
    try:
        assert sockets and {s.family for s in sockets} == {socket.AF_INET}
    finally:
        for sock in sockets:
            sock.close()
    with pytest.raises(OSError, match="no address family"):
        bind_socket("::1", 0, reuse_port=False)
