"""What one large message costs an ingress server in memory when the amqp plugin publishes it.

Starts a RabbitMQ node (as contrib/ingress-amqp's tests do: free 127.0.0.1 ports, everything in
a temporary folder) and an ingress server with the plugin, warms it up with a small message,
then sends one message of --mb MiB to a remote recipient and reports the server's peak resident
memory (VmHWM) before and after. The same with the plugin disabled (the builtin file queue
writes the message) gives the reference. The message is checked on the broker, byte count and
envelope. Run from the repository root with ingress and ingress-amqp installed:

    python bench/amqp_memory.py --mb 64
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "contrib" / "ingress-amqp" / "tests"))

from conftest import RabbitMQ  # noqa: E402  (the tests' broker, reused)

from ingress.testing import server_config, start_subprocess  # noqa: E402


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def message(mb: float) -> bytes:
    line = b"x" * 998 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * int(mb * 1024 * 1024 / len(line))


def measure(broker: RabbitMQ, workdir: Path, mb: float, plugin: bool) -> dict:
    config = {"plugins": {"amqp": {"url": broker.url, "queue": "bench", "max_message_mb": mb + 1},
                          "relay": {"whitelist": ["127.0.0.1"]},
                          "max_message_size": {"kb": int((mb + 1) * 1024)}}}
    server = start_subprocess(server_config(workdir, config), workdir,
                              disabled=() if plugin else ("amqp",))
    try:
        with smtplib.SMTP(server.host, server.port) as client:
            client.sendmail("a@far.test", ["b@remote.test"], b"Subject: warm-up\r\n\r\nx\r\n")
        before = peak_kib(server.pid)
        body = message(mb)
        with smtplib.SMTP(server.host, server.port, timeout=300) as client:
            client.sendmail("a@far.test", ["b@remote.test"], body)
        after = peak_kib(server.pid)
        del body
    finally:
        server.stop()
    published = broker.drain("bench") if plugin else []
    if plugin:
        assert len(published) == 2, len(published)
        assert max(len(m.body) for m in published) > len(message(mb))
    return {"before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=64, help="message size in MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="amqp-memory-") as tmp:
        (Path(tmp) / "rabbitmq").mkdir()
        broker = RabbitMQ(Path(tmp) / "rabbitmq")
        try:
            broker.start()
            for plugin in (True, False):
                name = "amqp plugin" if plugin else "file queue (plugin disabled)"
                result = measure(broker, Path(tmp) / name.split()[0], args.mb, plugin)
                grew = (result["after"] - result["before"]) / 1024
                print(f"{name}: {args.mb:g} MiB message: peak RSS {result['before'] / 1024:.1f}"
                      f" MiB before, {result['after'] / 1024:.1f} MiB after (+{grew:.1f} MiB)")
        finally:
            broker.close()


if __name__ == "__main__":
    main()
