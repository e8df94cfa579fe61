"""Prometheus metrics at server.metrics_listen, scraped and parsed like Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ingress.testing import eventually

CONFIG = {
    "server": {"metrics_listen": "127.0.0.1:0"},
    "directory": {"domains": ["example.test", "other.test"],
                  "users": [{"address": "alice@example.test", "password": "pw"},
                            {"address": "bob@other.test", "password": "pw"}]},
}


def scrape(server) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counters_follow_what_clients_do(ingress_server):
    server = ingress_server(CONFIG)
    body = "Subject: m\r\n\r\n" + "x" * 1000 + "\r\n"
    with server.smtp() as client:
        client.sendmail("s@example.org", ["alice@example.test", "bob@other.test"], body)
        client.sendmail("s@example.org", ["alice@example.test"], body)
        client.mail("s@example.org")
        assert client.rcpt("nobody@example.test")[0] == 550
    with server.smtp() as client:
        client.noop()
    metrics = scrape(server)
    assert metrics[("ingress_sessions_total", ())] == 2
    assert metrics[("ingress_messages_accepted_total", ())] == 2
    assert metrics[("ingress_bytes_accepted_total", ())] == 2 * len(body)
    assert metrics[("ingress_rejections_total", (("code", "550"), ("plugin", "mailbox")))] == 1
    assert metrics[("ingress_domain_messages_total", (("domain", "example.test"),))] == 2
    assert metrics[("ingress_domain_messages_total", (("domain", "other.test"),))] == 1


def test_refused_connections_are_counted_and_the_open_gauge_returns_to_zero(ingress_server):
    """max_connections refuses in on_connect, which ends that decision hook: observers count in
    connection_opened, which runs for every connection (the gauge used to go to -1 here)."""
    server = ingress_server({**CONFIG, "plugins": {"max_connections": {"limit": 1}}})
    with server.raw() as held:
        assert held.reply()[0] == 220
        with server.raw() as refused:
            assert refused.reply()[0] == 421
            assert refused.closed_by_server()
        assert held.cmd("QUIT")[0] == 221

    def settled():
        metrics = scrape(server)
        return (metrics[("ingress_open_connections", ())] == 0
                and metrics[("ingress_sessions_total", ())] == 2)

    eventually(settled, what="both connections counted, none open")
    metrics = scrape(server)
    refusals = ("ingress_rejections_total", (("code", "421"), ("plugin", "max_connections")))
    assert metrics[refusals] == 1


def test_other_paths_are_404(ingress_server):
    server = ingress_server(CONFIG)
    url = server.metrics_url.replace("/metrics", "/")
    try:
        urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        exc.close()
    else:
        raise AssertionError("expected 404")


def test_metrics_come_from_the_metrics_plugin(ingress_server):
    server = ingress_server(CONFIG, disabled=("metrics",))
    with server.smtp() as client:
        client.sendmail("s@example.org", ["alice@example.test"], "Subject: m\r\n\r\nx\r\n")
    assert scrape(server)[("ingress_messages_accepted_total", ())] == 0


def test_open_relay_turns_domain_statistics_off(ingress_server):
    server = ingress_server({**CONFIG, "plugins": {"relay": {"allow": "anyone"}}})
    with server.smtp() as client:
        client.sendmail("s@example.org", ["alice@example.test", "x@remote.test"],
                        "Subject: m\r\n\r\nx\r\n")
    metrics = scrape(server)
    assert metrics[("ingress_messages_accepted_total", ())] == 1
    assert not [name for name, _ in metrics if name.startswith("ingress_domain_messages")]
