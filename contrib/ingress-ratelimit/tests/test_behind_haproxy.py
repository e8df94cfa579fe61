"""ratelimit behind a real HAProxy that sends PROXY headers: clients are counted by the address
the header names, not by HAProxy's."""

from __future__ import annotations

import pytest
from ingress.testing import HAProxy

HOUR = 3600


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_connections_are_counted_per_proxied_client(ingress_server, tmp_path, option):
    server = ingress_server({
        "server": {"proxy_protocol": ["127.0.0.1"]},
        "plugins": {"ratelimit": {"window_seconds": HOUR, "max_connections": 1}},
    })
    with HAProxy(tmp_path / "haproxy", [(server.host, server.port)], option) as proxy:
        with proxy.raw(source="127.0.0.2") as client:
            assert client.reply()[0] == 220
        with proxy.raw(source="127.0.0.2") as client:
            assert client.reply() == (421, "4.7.0 mx.test Too many connections from 127.0.0.2, "
                                           "try again later")
        with proxy.raw(source="127.0.0.3") as client:
            assert client.reply()[0] == 220, "127.0.0.3 is another client"
    assert "refusing connection from 127.0.0.2" in server.log()
    assert "127.0.0.1" not in server.log().replace("listening on 127.0.0.1", "")
