"""amqp against a real RabbitMQ node (see conftest.py) and a real ingress server (the installed
entry point), with real SMTP clients."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import ingress_schemas
import jsonschema
import pytest
from ingress.testing import deep_merge, eventually

DIRECTORY = {
    "domains": ["example.test"],
    "users": [{"address": "alice@example.test", "password": "x"},
              {"address": "bob@example.test", "password": "x"}],
    "aliases": {"team@example.test": ["bob@example.test", "carol@elsewhere.test"]},
}
BODY = b"From: alice@example.test\r\nSubject: amqp\r\n\r\nHello, broker.\r\n"
ENVELOPE = jsonschema.Draft202012Validator(ingress_schemas.load("envelope"))
# Every test here drives a real RabbitMQ node (a session's broker: about 40 s with its start,
# 90 s with the restarts under load): a slow suite on a real broker, run in one tox
# environment only, contrib-py311, which sets INGRESS_AMQP_SLOW=1.
pytestmark = pytest.mark.skipif(
    os.environ.get("INGRESS_AMQP_SLOW") != "1",
    reason="a real RabbitMQ broker: INGRESS_AMQP_SLOW=1 (tox env contrib-py311 sets it)")


def config(broker, **settings) -> dict:
    return {"directory": DIRECTORY,
            "plugins": {"amqp": {"url": broker.url, "queue": settings.pop("queue"), **settings},
                        "relay": {"whitelist": ["127.0.0.1"]}}}


@pytest.fixture
def queue(running):
    """A fresh queue name (deleted afterwards)."""
    name = f"ingress-{uuid.uuid4().hex[:8]}"
    yield name
    if running.process is not None:
        running.delete_queue(name)


def data(server, sender, recipients, body=BODY, mail_options=(), rcpt_options=()):
    """One transaction; the reply to DATA as (code, text)."""
    with server.smtp() as client:
        client.ehlo("client.example.org")
        assert client.mail(sender, list(mail_options))[0] == 250
        for rcpt in recipients:
            assert client.rcpt(rcpt, list(rcpt_options))[0] == 250
        code, text = client.data(body)
        return code, text.decode()


def queued_id(text: str) -> str:
    assert text.startswith("2.0.0 OK: queued as "), text
    return text.rsplit(" ", 1)[1]


def nothing_stored(server) -> bool:
    return not server.all_messages() and not server.queue_entries() and not any(
        server.queue.glob("tmp/*"))


def check_message(message, queue_id: str, body: bytes) -> dict:
    """The broker message as the contract says; returns its envelope."""
    assert message.message_id == queue_id
    assert message.content_type == "message/rfc822"
    assert message.delivery_mode == 2  # persistent
    text = message.headers["x-ingress-envelope"]
    if isinstance(text, bytes):
        text = text.decode()
    envelope = json.loads(text)
    ENVELOPE.validate(envelope)
    assert text == json.dumps(envelope, indent=1, sort_keys=True), "the .json text, exactly"
    assert envelope["id"] == queue_id
    received, rest = message.body.split(b"\r\n", 1)
    assert received.startswith(b"Received: from client.example.org")
    assert rest.endswith(body)
    return envelope


@pytest.mark.parametrize("enabled", [True, False])
def test_message_is_published_byte_for_byte_with_its_envelope(ingress_server, running, queue,
                                                             enabled):
    server = ingress_server(config(running, queue=queue),
                            disabled=() if enabled else ("amqp",))
    # a message over several frames (128 KiB each) and spooled to disk (over 1 MiB)
    big = BODY + b"".join(b"%07d " % i + b"x" * 72 + b"\r\n" for i in range(20000))
    code, text = data(server, "alice@example.test", ["carol@elsewhere.test", "dan@far.test"],
                      big, mail_options=["RET=HDRS", "ENVID=e1"],
                      rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
    assert code == 250
    queue_id = queued_id(text)
    messages = running.drain(queue)
    if not enabled:
        assert messages == [] and len(server.queue_entries()) == 1
        return
    [message] = messages
    envelope = check_message(message, queue_id, big)
    assert len(message.body) > 1 << 20
    assert envelope["mail_from"] == "alice@example.test"
    assert envelope["mail_params"] == {"RET": "HDRS", "ENVID": "e1"}
    assert envelope["recipients"] == [
        {"address": a, "params": {"NOTIFY": "SUCCESS,FAILURE"}}
        for a in ("carol@elsewhere.test", "dan@far.test")]
    assert nothing_stored(server), "the broker holds it, not this node"


@pytest.mark.parametrize("local", [False, True])
def test_local_recipients(ingress_server, running, queue, local):
    server = ingress_server(config(running, queue=queue, local=local))
    code, text = data(server, "x@far.test", ["alice@example.test", "team@example.test"])
    assert code == 250
    [message] = running.drain(queue)
    envelope = check_message(message, queued_id(text), BODY)
    addresses = [r["address"] for r in envelope["recipients"]]
    if local:
        assert addresses == ["alice@example.test", "bob@example.test", "carol@elsewhere.test"]
        assert not server.all_messages()
    else:
        assert addresses == ["carol@elsewhere.test"]
        assert [len(server.mailbox(a)) for a in ("alice@example.test", "bob@example.test")] == [
            1, 1]
    # only local recipients and local = false: no broker message at all
    code, _ = data(server, "x@far.test", ["alice@example.test"])
    assert code == 250
    assert len(running.drain(queue)) == (1 if local else 0)
    assert len(server.mailbox("alice@example.test")) == (0 if local else 2)


def test_a_classic_queue_of_that_name_is_a_startup_error(ingress_server, running, queue):
    running.declare_classic(queue)
    with pytest.raises(RuntimeError) as failed:
        ingress_server(config(running, queue=queue))
    assert "exited (2)" in str(failed.value)
    assert f"queue '{queue}'" in str(failed.value)
    assert "not a durable quorum queue" in str(failed.value)
    assert "Traceback" not in str(failed.value)


def test_the_queue_is_declared_as_a_durable_quorum_queue(ingress_server, running, queue):
    ingress_server(config(running, queue=queue))
    assert running.queue_type(queue) == "quorum true"


def test_message_over_max_message_mb_gets_552(ingress_server, running, queue):
    server = ingress_server(config(running, queue=queue, max_message_mb=0.01))  # 10485 bytes
    with server.smtp() as client:
        client.ehlo("client.example.org")
        assert client.esmtp_features["size"] == "10485"  # not max_message_size's larger limit
        assert client.mail("a@far.test", ["SIZE=20000"]) == (
            552, b"5.3.4 Message size exceeds fixed limit")
        assert client.rset()[0] == 250
        assert client.mail("a@far.test", ["SIZE=10000"])[0] == 250
        assert client.rcpt("carol@elsewhere.test")[0] == 250
        assert client.data(BODY + b"y" * 20000 + b"\r\n") == (
            552, b"5.3.4 Message size exceeds fixed limit")
        assert client.mail("a@far.test")[0] == 250
        assert client.rcpt("carol@elsewhere.test")[0] == 250
        assert client.data(BODY + b"y" * 8000 + b"\r\n")[0] == 250
    assert len(running.drain(queue)) == 1
    assert not server.queue_entries()


@pytest.fixture
def full_queue(running, queue):
    """*queue* under a policy that makes the broker refuse (nack) publishes once it holds one
    message (a quorum queue may take one more before it notices)."""
    assert running.ctl("set_policy", f"full-{queue}", f"^{queue}$",
                       '{"max-length": 1, "overflow": "reject-publish"}',
                       "--apply-to", "queues").returncode == 0
    yield queue
    running.ctl("clear_policy", f"full-{queue}")


def until_refused(server, recipients) -> tuple[int, str]:
    """Send until the broker refuses; the number of 250s and the refusal."""
    for accepted in range(5):
        code, text = data(server, "a@far.test", recipients)
        if code != 250:
            return accepted, f"{code} {text}"
    raise AssertionError("the broker never refused")


@pytest.mark.parametrize("local", [True, False])
def test_a_nack_gets_451_and_leaves_nothing(ingress_server, running, full_queue, local):
    server = ingress_server(config(running, queue=full_queue, local=local))
    accepted, refusal = until_refused(server, ["alice@example.test", "team@example.test"])
    assert refusal.startswith("451 4.3.0 ")
    assert len(running.drain(full_queue)) == accepted >= 1
    # local = false: the Maildir copies were written before the publish, then removed
    assert len(server.all_messages()) == (0 if local else 2 * accepted)
    assert not server.queue_entries() and not any(server.queue.glob("tmp/*"))
    assert "the broker refused the message (nack)" in server.log()


def test_no_confirm_within_confirm_timeout_gets_451(ingress_server, running, queue):
    server = ingress_server(config(running, queue=queue, confirm_timeout=1))
    assert data(server, "a@far.test", ["carol@elsewhere.test"])[0] == 250
    # A memory alarm: the broker stops reading from publishing connections, so no confirm.
    assert running.ctl("set_vm_memory_high_watermark", "0").returncode == 0
    try:
        code, text = data(server, "a@far.test", ["alice@example.test", "carol@elsewhere.test"])
        assert (code, text[:5]) == (451, "4.3.0")
        assert "no confirm from the broker within 1s" in server.log()
        assert len(server.all_messages()) == 0 and not server.queue_entries()
    finally:
        assert running.ctl("set_vm_memory_high_watermark", "0.4").returncode == 0
    eventually(lambda: data(server, "a@far.test", ["carol@elsewhere.test"])[0] == 250,
               timeout=60, what="publishing again after the alarm")
    # the refused message may still reach the queue (its 451 asks for a retry: a duplicate)
    assert 2 <= len(running.drain(queue)) <= 3
    assert "Traceback" not in server.log()


def test_each_worker_has_its_own_connection(ingress_server, running, queue):
    before = connections(running)
    server = ingress_server({**config(running, queue=queue), "server": {"workers": 2}})
    eventually(lambda: connections(running) == before + 2, what="two connections")
    ids = {queued_id(data(server, "a@far.test", ["carol@elsewhere.test"])[1])
           for _ in range(6)}
    assert {m.message_id for m in running.drain(queue)} == ids
    assert server.stop() == 0
    eventually(lambda: connections(running) == before, what="connections closed")
    log = server.log()
    assert "Traceback" not in log and "nclosed" not in log, log


def connections(broker) -> int:
    out = broker.ctl("list_connections", "name", "--quiet", "--no-table-headers").stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_broker_down_at_start_and_stopped_under_load(ingress_server, running, queue):
    running.stop()
    server = ingress_server(deep_merge(config(running, queue=queue),
                                       {"plugins": {"max_bad_commands": {"limit": 0}}}))
    code, text = data(server, "a@far.test", ["carol@elsewhere.test"])
    assert (code, text[:5]) == (451, "4.3.0"), "serves while the broker is down"
    assert nothing_stored(server)
    running.start()
    eventually(lambda: "is back after" in server.log(), timeout=60, what="reconnected")

    accepted: list[str] = []
    refused: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def client():
        try:
            send_many()
        except BaseException as exc:
            errors.append(exc)

    def send_many():
        with server.smtp() as smtp:
            smtp.ehlo("client.example.org")
            for _ in range(3000):  # bounded; ends when the test says so
                if done.is_set():
                    break
                smtp.mail("a@far.test")
                smtp.rcpt("carol@elsewhere.test")
                code, text = smtp.data(BODY)
                if code == 250:
                    accepted.append(queued_id(text.decode()))
                else:
                    assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
                    refused.append(code)
                    time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: errors or len(accepted) >= 50, timeout=60, what="some accepted")
        running.stop()  # mid-load
        eventually(lambda: errors or len(refused) >= 4, timeout=60, what="451s (broker down)")
        running.start()
        eventually(lambda: errors or server.log().count("is back after") == 2, timeout=60,
                   what="reconnected")
        before = len(accepted)
        eventually(lambda: errors or len(accepted) >= before + 50, timeout=60,
                   what="accepted again")
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    found = [m.message_id for m in running.drain(queue)]
    assert set(accepted) <= set(found), "every 250 is on the queue"
    assert len(found) == len(set(found))
    log = server.log()
    assert log.count("unavailable (") == 2, log  # at start, and once for the stop under load
    assert log.count("is back after") == 2, log
    assert "Traceback" not in log, log
    assert server.stop() == 0
    assert "Traceback" not in server.log() and "nclosed" not in server.log()
