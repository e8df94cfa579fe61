"""A plugin that raises, hangs or returns nonsense fails closed (451 4.3.0), logged by name."""

from __future__ import annotations

import pytest

from ingress.testing import eventually

CONFIG = {
    "server": {"plugin_modules": ["faulty"]},
    "plugins": {"faulty": {}},
    "directory": {"domains": ["example.test"],
                  "domain_settings": {"example.test": {"catch_all": True}}},
}


@pytest.mark.parametrize("local", ["raise", "hang", "nonsense"])
def test_failing_decision_hook_tempfails_and_session_goes_on(ingress_server, local):
    server = ingress_server({**CONFIG, "server": {**CONFIG["server"], "hook_timeout": 0.5}})
    with server.smtp() as client:
        client.ehlo()
        client.mail("s@example.org")
        code, text = client.rcpt(f"{local}@example.test")
        assert (code, text[:5]) == (451, b"4.3.0")
        assert client.rcpt("fine@example.test")[0] == 250
        assert client.data("Subject: x\r\n\r\nx\r\n")[0] == 250
    assert "plugin faulty" in server.log()


def test_failing_delivery_backend_tempfails_and_stores_nothing(ingress_server):
    server = ingress_server(CONFIG)
    with server.smtp() as client:
        client.ehlo()
        client.mail("crash@example.org")
        client.rcpt("fine@example.test")
        code, text = client.data("Subject: x\r\n\r\nx\r\n")
        assert (code, text[:5]) == (451, b"4.3.0")
    assert server.all_messages() == []
    assert "plugin faulty failed in deliver" in server.log()


def test_a_hung_delivery_backend_is_cut_at_hook_timeout(ingress_server):
    """deliver is a first-result hook: it used to be awaited without any bound."""
    server = ingress_server({**CONFIG, "server": {**CONFIG["server"], "hook_timeout": 0.5}})
    with server.smtp(timeout=60) as client:
        client.ehlo()
        client.mail("hang@example.org")
        client.rcpt("fine@example.test")
        code, text = client.data("Subject: x\r\n\r\nx\r\n")
        assert (code, text[:5]) == (451, b"4.3.0")
        assert client.noop()[0] == 250  # the session goes on
    assert server.all_messages() == []
    assert "plugin faulty did not answer deliver within 0.5s" in server.log()


def test_a_message_stored_after_the_hook_timeout_is_removed_again(ingress_server):
    """The disk stalls past hook_timeout while the builtin delivery writes: 451, and the copy
    stored once the disk comes back goes, so the client's retry does not make a second one."""
    server = ingress_server({"server": {"plugin_modules": ["slow_disk"], "hook_timeout": 0.3},
                             "plugins": {"slow_disk": {"seconds": 1.0}},
                             "directory": CONFIG["directory"]})
    with server.smtp(timeout=30) as client:
        client.ehlo()
        client.mail("s@example.org")
        client.rcpt("fine@example.test")
        code, text = client.data("Subject: x\r\n\r\nx\r\n")
        assert (code, text[:5]) == (451, b"4.3.0")
    eventually(lambda: "stored after its session stopped waiting" in server.log(),
               what="the warning")
    assert server.all_messages() == []
