"""The server's memory from its first moment: no start-up peak (the argon2 dummy hash is made at
the first password check, not at start)."""

from __future__ import annotations

import argon2


def vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_peak_rss_after_start_is_small(ingress_server):
    hashed = argon2.PasswordHasher().hash("pw")  # default parameters: 64 MiB memory cost
    server = ingress_server({"directory": {"domains": ["example.test"], "users": [
        {"address": "alice@example.test", "password_hash": hashed}]}})
    with server.smtp() as client:
        client.noop()
    assert vm(server.pid, "VmHWM") < 64 * 1024 * 1024
