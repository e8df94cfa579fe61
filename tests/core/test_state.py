"""server.state: the plugins' key-value store, in memory and on a real Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from ingress.state import MemoryBackend, RedisBackend, StateUnavailable
from ingress.testing import eventually

LOCAL = {"directory": {"domains": ["example.test"],
                       "domain_settings": {"example.test": {"catch_all": True}}}}
OUTAGE = "state: Redis 127.0.0.1:{port}/0 unavailable"
BACK = "state: Redis 127.0.0.1:{port}/0 is back"


def counting(redis_url: str | None = None, **server) -> dict:
    if redis_url:
        server["state"] = redis_url
    return {**LOCAL, "server": {"plugin_modules": ["state_counter"], **server},
            "plugins": {"state_counter": {}}}


def rcpt(server, times: int = 1) -> list[tuple[int, bytes]]:
    with server.smtp() as client:
        client.ehlo()
        client.mail("a@example.org")
        return [client.rcpt(f"u{i}@example.test") for i in range(times)]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# --- the Store contract, on both backends --------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def backend(request, tmp_path):
    if request.param == "memory":
        yield lambda: MemoryBackend()
        return
    redis = request.getfixturevalue("ingress_redis")
    yield lambda: RedisBackend(redis.url, 2.0)


def run(backend_factory, scenario):
    async def main():
        backend = backend_factory()
        try:
            return await scenario(backend)
        finally:
            await backend.close()
    return asyncio.run(main())


def test_get_set_delete_and_only_if_absent(backend):
    async def scenario(b):
        s = b.store("p")
        assert await s.get("k") is None
        assert await s.set("k", "v1") is True
        assert await s.get("k") == "v1"
        assert await s.set("k", "v2", only_if_absent=True) is False
        assert await s.get("k") == "v1"
        assert await s.set("k", 7) is True
        assert await s.get("k") == "7"
        assert await s.delete("k") is True
        assert await s.delete("k") is False
        assert await s.set("k", "v3", only_if_absent=True) is True
        assert await s.get("k") == "v3"
    run(backend, scenario)


def test_incr_is_atomic_and_returns_the_new_value(backend):
    async def scenario(b):
        s = b.store("p")
        assert await s.incr("n") == 1
        assert await s.incr("n", 5) == 6
        assert await s.incr("n", -2) == 4
        results = await asyncio.gather(*(s.incr("c") for _ in range(200)))
        assert sorted(results) == list(range(1, 201))
        await s.set("text", "abc")
        with pytest.raises(ValueError):
            await s.incr("text")
    run(backend, scenario)


def test_each_plugin_sees_only_its_own_keys(backend):
    async def scenario(b):
        one, two = b.store("one"), b.store("two")
        await one.set("k", "from one")
        assert await two.get("k") is None
        assert await two.incr("k") == 1
        assert await one.get("k") == "from one"
        assert await two.delete("k") is True
        assert await one.get("k") == "from one"
    run(backend, scenario)


def test_keys_expire_after_their_ttl(backend):
    async def scenario(b):
        s = b.store("p")
        await s.set("short", "x", ttl=1)
        assert await s.incr("counter", ttl=1) == 1
        assert await s.incr("counter", ttl=60) == 2, "the expiry is set by the first incr"
        await s.set("long", "y", ttl=60)
        await asyncio.sleep(1.5)
        assert await s.get("short") is None
        assert await s.get("counter") is None
        assert await s.get("long") == "y"
        assert await s.set("short", "z", only_if_absent=True) is True
    run(backend, scenario)


# --- the in-process backend stays bounded ------------------------------------------------------


def test_memory_backend_purges_expired_keys_and_has_a_cap(caplog):
    clock = Clock()
    backend = MemoryBackend(max_keys=100, clock=clock)
    s = backend.store("p")

    async def scenario():
        for i in range(50):
            await s.set(f"k{i}", "x", ttl=10)
        clock.now += 11
        await s.set("fresh", "x", ttl=10)
        assert len(backend) == 1, "expired keys are dropped by later writes"
        for _ in range(5000):  # one key rewritten: stale expiry entries do not pile up
            await s.set("fresh", "x", ttl=1000)
        assert len(backend._expiry) < 2000
        for i in range(1000):
            await s.incr(f"client{i}", ttl=1000)
        assert len(backend) == 100
        assert await s.get("client999") == "1"
        assert await s.get("client0") is None, "the oldest keys were forgotten"

    asyncio.run(scenario())
    assert caplog.text.count("forgetting the oldest ones") == 1


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["memcached://127.0.0.1:11211", "redis:/x", "",
                                   "redis://h:99999/0"])
def test_check_config_rejects_a_bad_state(tmp_path, value):
    path = tmp_path / "ingress.toml"
    path.write_text(f'[server]\nstate = "{value}"\n')
    result = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}: /server/state: ")


@pytest.mark.parametrize("value", ["memory", "redis://127.0.0.1:6379/0",
                                   "redis://:secret@redis.example:6380/3", "redis://[::1]:6379"])
def test_check_config_accepts_memory_and_redis_urls(tmp_path, value):
    path = tmp_path / "ingress.toml"
    path.write_text(f'[server]\nstate = "{value}"\nstate_timeout = 0.5\n')
    result = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_state_timeout_must_be_positive(tmp_path):
    path = tmp_path / "ingress.toml"
    path.write_text("[server]\nstate_timeout = 0\n")
    result = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{path}: /server/state_timeout: " in result.stderr


# --- plugins use it through a real server ---------------------------------------------------


def test_plugins_get_their_own_store_as_a_hook_argument(ingress_server):
    config = counting()
    config["server"]["plugin_modules"].append("state_other")
    config["plugins"]["state_other"] = {}
    server = ingress_server(config)
    assert rcpt(server, 2) == [(250, b"2.1.5 count 1"), (250, b"2.1.5 count 2")]
    assert rcpt(server) == [(250, b"2.1.5 count 3")], "memory state lives as long as the server"


def test_memory_state_is_per_server(ingress_server):
    one, two = ingress_server(counting(), name="one"), ingress_server(counting(), name="two")
    assert rcpt(one, 2)[-1] == (250, b"2.1.5 count 2")
    assert rcpt(two) == [(250, b"2.1.5 count 1")]


def test_redis_state_is_shared_by_servers_and_workers(ingress_server, ingress_redis):
    one = ingress_server(counting(ingress_redis.url, workers=2), name="one")
    two = ingress_server(counting(ingress_redis.url), name="two")
    counts = []
    for i in range(10):
        counts += [text for _, text in rcpt(one if i % 2 else two, 2)]
    assert sorted(int(t.split()[-1]) for t in counts) == list(range(1, 21))


def test_redis_outage_fails_closed_once_logged_and_recovers(ingress_server, ingress_redis):
    server = ingress_server(counting(ingress_redis.url))
    port = ingress_redis.port
    with server.smtp() as client:
        client.ehlo()
        client.mail("a@example.org")
        assert client.rcpt("u1@example.test") == (250, b"2.1.5 count 1")
        ingress_redis.stop()
        for i in range(5):
            code, text = client.rcpt(f"down{i}@example.test")
            assert (code, text[:5]) == (451, b"4.3.0")
        assert client.noop()[0] == 250, "the session goes on"
        ingress_redis.start()
        assert client.rcpt("u2@example.test") == (250, b"2.1.5 count 1"), \
            "the new Redis is empty; the server uses it without a restart"
    log = server.log()
    assert log.count(OUTAGE.format(port=port)) == 1
    assert "Traceback" not in log
    eventually(lambda: BACK.format(port=port) in server.log(), what="the back line")
    assert server.log().count(BACK.format(port=port)) == 1


def test_redis_that_does_not_answer_fails_closed_within_state_timeout(ingress_server,
                                                                      ingress_redis):
    server = ingress_server(counting(ingress_redis.url, state_timeout=0.5))
    assert rcpt(server) == [(250, b"2.1.5 count 1")]
    ingress_redis.pause()
    try:
        with server.smtp(timeout=10) as client:  # a hang would be a socket timeout here
            client.ehlo()
            client.mail("a@example.org")
            for i in range(3):
                code, text = client.rcpt(f"u{i}@example.test")
                assert (code, text[:5]) == (451, b"4.3.0")
            assert client.noop()[0] == 250
        with server.smtp(timeout=10) as other:
            assert other.ehlo()[0] == 250, "other sessions are served meanwhile"
    finally:
        ingress_redis.resume()
    # Served again. Commands that timed out may still run once Redis reads them (their bytes
    # were on its socket): the count is 2 or more, never an error.
    [(code, text)] = rcpt(server)
    assert code == 250 and 2 <= int(text.split()[-1]) <= 5
    assert server.log().count(OUTAGE.format(port=ingress_redis.port)) == 1


def test_server_starts_while_redis_is_down(ingress_server, ingress_redis):
    ingress_redis.stop()
    server = ingress_server(counting(ingress_redis.url))
    with server.smtp() as client:
        client.ehlo()
        client.mail("a@example.org")
        assert client.rcpt("u@example.test")[0] == 451
    ingress_redis.start()
    assert rcpt(server) == [(250, b"2.1.5 count 1")]


def test_store_raises_state_unavailable_without_redis(ingress_redis):
    ingress_redis.stop()

    async def scenario(b):
        with pytest.raises(StateUnavailable):
            await b.store("p").get("k")
    run(lambda: RedisBackend(ingress_redis.url, 0.5), scenario)

