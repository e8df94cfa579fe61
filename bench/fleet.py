"""The fleet run (FLEET.md section 4).

On 127.0.0.1 only, in a temporary folder: a three-node RabbitMQ cluster (Debian's
rabbitmq-server; one private epmd), one redis-server (ingress.testing.RedisServer), three ingress
nodes (each its own process and config, server.state on that Redis, server.proxy_protocol naming
HAProxy's address, the ratelimit plugin of contrib/ingress-ratelimit with limits the client never
reaches, so that every connection and every MAIL is counted on Redis, and delivery through the
amqp plugin with local = true, node i publishing to RabbitMQ node i), and HAProxy in front of them
(ingress.testing.HAProxy: mode tcp, round robin, send-proxy-v2, an SMTP health check every
300 ms, which arrives as a PROXY v2 LOCAL header). A client that numbers its messages (header
X-Seq) sends through HAProxy from its own address 127.0.0.2 and several connections, retrying a
message that got no 250 (4xx, a cut connection); behind send-proxy-v2 the nodes see 127.0.0.2,
so its connections stay under max_connections.per_ip (set to 50, checked against --connections).
Under that load the run SIGKILLs one ingress node and restarts it, and stops one RabbitMQ node and
starts it again. Then it drains the quorum queue and counts: acknowledged (250 received), found,
lost (acknowledged but absent: must be 0), duplicates (a number present twice: allowed only when
no more than one of its copies got a 250 to the client), the messages whose Received header names
127.0.0.2 (the PROXY header reached the nodes), the MAIL commands counted on Redis, and the
throughput against one ingress node writing its Maildir under the same client.

    python bench/fleet.py --messages 20000 --runs 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "contrib" / "ingress-amqp" / "tests"))

from conftest import RabbitMQ, free_port  # noqa: E402  (the tests' broker node, reused)

from ingress.testing import HAProxy, RedisServer  # noqa: E402

QUEUE = "ingress"
READY = re.compile(r"ingress: listening on (\S+):(\d+) \(smtp\)")
DOMAIN = "example.test"
CLIENT_IP = "127.0.0.2"  # the client's own address, which the PROXY header carries to the nodes
PER_IP = 50  # max_connections.per_ip on the nodes (the default, written out)
# Limits the client never reaches: every connection and MAIL still costs Redis round trips.
RATELIMIT = {"window_seconds": 3600, "max_connections": 10_000_000, "max_messages": 10_000_000}


class Cluster:
    """Three RabbitMQ nodes joined into one cluster."""

    def __init__(self, root: Path):
        self.epmd_port = free_port()
        self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port)],
                                     env=dict(os.environ, ERL_EPMD_ADDRESS="127.0.0.1"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cookie = f"FLEET{os.getpid()}"
        self.nodes = []
        for i in range(3):
            (root / f"rabbit{i}").mkdir()
            self.nodes.append(RabbitMQ(root / f"rabbit{i}", name=f"fleet{i}-{os.getpid()}",
                                       epmd_port=self.epmd_port, cookie=cookie))

    def start(self) -> None:
        first = self.nodes[0]
        first.start()
        for node in self.nodes[1:]:
            node.start()
            for args in (("stop_app",), ("join_cluster", first.node), ("start_app",)):
                for _attempt in range(3):  # on a loaded machine a ctl call now and then times out
                    done = node.ctl(*args)
                    if done.returncode == 0:
                        break
                    time.sleep(2)
                else:
                    raise RuntimeError(f"{node.node} {args}: {done.stderr}")

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.epmd.kill()
        self.epmd.wait()


class Ingress:
    """One ingress node: its own process, config and folder."""

    def __init__(self, root: Path, name: str, plugins: dict, port: int = 0,
                 server: dict | None = None):
        self.root = root / name
        self.root.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.config = self.root / "ingress.json"
        self.config.write_text(json.dumps({
            "server": {"hostname": f"{name}.test", "listen": [f"127.0.0.1:{self.port}"],
                       "drain_seconds": 5, **(server or {})},
            "directory": {"domains": [DOMAIN],
                          "domain_settings": {DOMAIN: {"catch_all": True}}},
            "delivery": {"maildir": str(self.root / "mail"), "queue": str(self.root / "queue")},
            "plugins": plugins,
        }, indent=1))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "ingress.log", "ab")  # noqa: SIM115 - the server writes to it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ingress", "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=log, cwd=self.root)
        log.close()
        line = self.process.stdout.readline().decode()
        if not READY.search(line):
            raise RuntimeError(f"ingress {self.root.name} did not start: "
                               + (self.root / "ingress.log").read_text())
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def maildir_count(self) -> int:
        return sum(1 for _ in (self.root / "mail").glob("*/*/new/*"))


class Client:
    """Sends messages 0..n-1 (header X-Seq) from *connections* threads, each message until it
    gets a 250 or *attempts* tries failed (a new connection after each); records the queue id
    of every 250."""

    def __init__(self, port: int, n: int, connections: int, attempts: int = 200):
        self.port, self.n, self.connections, self.attempts = port, n, connections, attempts
        self.acked: dict[int, str] = {}
        self.failures = Counter()
        self.next = 0
        self.lock = threading.Lock()

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.n:
                return None
            self.next += 1
            return self.next - 1

    def run(self) -> float:
        started = time.monotonic()
        threads = [threading.Thread(target=self.worker) for _ in range(self.connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.monotonic() - started

    def worker(self) -> None:
        smtp = None
        seq = self.take()
        tries = 0
        while seq is not None:
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30,
                                        source_address=(CLIENT_IP, 0))
                    smtp.ehlo("client.test")
                body = (f"From: <load@far.test>\r\nX-Seq: {seq}\r\nSubject: fleet {seq}\r\n\r\n"
                        f"message {seq}\r\n").encode()
                smtp.mail("load@far.test")
                code, _ = smtp.rcpt(f"user{seq % 50}@{DOMAIN}")
                if code != 250:
                    raise smtplib.SMTPResponseException(code, b"rcpt")
                code, text = smtp.data(body)
                if code == 250:
                    self.acked[seq] = text.decode().rsplit(" ", 1)[1]
                    seq, tries = self.take(), 0
                    continue
                # Refused for now: like an MTA's next try, a new connection (HAProxy may
                # send it to another node).
                self.failures[code] += 1
                smtp.quit()
                smtp = None
            except (OSError, smtplib.SMTPException) as exc:
                self.failures[type(exc).__name__] += 1
                try:
                    if smtp is not None:
                        smtp.close()
                finally:
                    smtp = None
            tries += 1
            if tries >= self.attempts:
                seq, tries = self.take(), 0  # given up: never acknowledged
            time.sleep(0.05)
        if smtp is not None:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass


def drain(node: RabbitMQ) -> list[tuple[int, str, bool]]:
    """(X-Seq, message_id, whether its header names CLIENT_IP) of every message on the queue
    (consumed and acked)."""
    import aio_pika

    async def main():
        found = []
        async with await aio_pika.connect(node.url) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await channel.get_queue(QUEUE, ensure=True)
            try:
                async with queue.iterator(timeout=5) as messages:  # ends 5 s after the last
                    async for message in messages:
                        match = re.search(rb"^X-Seq: (\d+)\r$", message.body, re.M)
                        head = message.body.split(b"\r\n\r\n", 1)[0]
                        found.append((int(match[1]), message.message_id,
                                      CLIENT_IP.encode() in head))
                        await message.ack()
            except asyncio.TimeoutError:
                pass
        return found

    return asyncio.run(main())


def baseline(root: Path, messages: int, connections: int) -> float:
    """msgs/s of one ingress node writing its Maildir, same client, no proxy."""
    node = Ingress(root, "single", {})
    node.start()
    try:
        client = Client(node.port, messages, connections)
        elapsed = client.run()
        assert len(client.acked) == messages and node.maildir_count() == messages
    finally:
        node.stop()
    return messages / elapsed


def redis_counts(redis: RedisServer) -> dict[str, int]:
    """The ratelimit plugin's counters on Redis, summed per kind (conn, mail)."""
    import redis as redis_py

    client = redis_py.Redis(port=redis.port)
    counts: Counter = Counter()
    try:
        for key in client.scan_iter("ingress:ratelimit:*"):
            kind, ip = key.decode().split(":")[2:4]
            if ip == CLIENT_IP:
                counts[kind] += int(client.get(key) or 0)
    finally:
        client.close()
    return dict(counts)


def fleet_run(root: Path, messages: int, connections: int, cluster: Cluster,
              redis: RedisServer) -> dict:
    server = {"state": redis.url, "proxy_protocol": ["127.0.0.1"]}
    nodes = [Ingress(root, f"ingress{i}",
                     {"amqp": {"url": cluster.nodes[i].url, "queue": QUEUE, "local": True},
                      "ratelimit": RATELIMIT, "max_connections": {"per_ip": PER_IP}},
                     server=server)
             for i in range(3)]
    for node in nodes:
        node.start()
    proxy = HAProxy(root / "haproxy", [("127.0.0.1", n.port) for n in nodes],
                    "send-proxy-v2 check inter 300ms fall 1 rise 1",
                    ("option smtpchk EHLO lb.test", "retries 2", "option redispatch")).start()
    client = Client(proxy.port, messages, connections)
    events = []

    def chaos():
        def when(fraction):
            while len(client.acked) < messages * fraction and client.next < messages:
                time.sleep(0.05)
        when(0.25)
        events.append(f"SIGKILL ingress1 at {len(client.acked)} acknowledged")
        nodes[1].kill()
        time.sleep(1)
        nodes[1].start()
        events.append(f"ingress1 restarted at {len(client.acked)}")
        when(0.4)
        events.append(f"stop rabbit2 at {len(client.acked)}")
        cluster.nodes[2].stop()
        time.sleep(3)
        cluster.nodes[2].start()
        events.append(f"rabbit2 started again at {len(client.acked)}")

    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    try:
        elapsed = client.run()
        chaos_thread.join()
    finally:
        proxy.stop()
        for node in nodes:
            node.stop()
    found = drain(cluster.nodes[0])
    seqs = Counter(seq for seq, _, _ in found)
    acked_ids = set(client.acked.values())
    lost = sorted(set(client.acked) - set(seqs))
    duplicates = {seq: n for seq, n in seqs.items() if n > 1}
    bad_duplicates = [seq for seq in duplicates
                      if sum(1 for s, mid, _ in found if s == seq and mid in acked_ids) > 1]
    local_files = sum(node.maildir_count() for node in nodes)
    return {"acknowledged": len(client.acked), "found": len(found), "distinct": len(seqs),
            "lost": len(lost), "duplicates": len(duplicates),
            "duplicates_with_two_250s": len(bad_duplicates), "maildir_files": local_files,
            "received_names_client": sum(1 for *_, named in found if named),
            "redis_counts": redis_counts(redis),
            "failures": dict(client.failures), "seconds": round(elapsed, 1),
            "msgs_per_s": round(len(client.acked) / elapsed, 1), "events": events}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if not 0 < args.connections < PER_IP:
        parser.error(f"--connections must be between 1 and {PER_IP - 1} (max_connections.per_ip "
                     "counts the client's connections on each node)")
    for program in ("haproxy", "epmd", "redis-server"):
        if shutil.which(program) is None:
            sys.exit(f"{program} is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="ingress-fleet-"))
    status = 0
    try:
        single = baseline(tmp, args.messages, args.connections)
        print(f"one node writing its Maildir: {single:.1f} msgs/s", flush=True)
        for run in range(args.runs):
            root = tmp / f"run{run}"
            root.mkdir()
            cluster = Cluster(root)
            redis = RedisServer(root / "redis")
            try:
                redis.start()
                cluster.start()
                result = fleet_run(root, args.messages, args.connections, cluster, redis)
            finally:
                cluster.close()
                redis.stop()
            result["vs_one_node"] = round(result["msgs_per_s"] / single, 2)
            print(f"run {run + 1}: " + json.dumps(result), flush=True)
            if (result["lost"] or result["duplicates_with_two_250s"]
                    or result["received_names_client"] != result["found"]):
                status = 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
