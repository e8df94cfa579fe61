import pytest

POLICY = {"plugins": {"hello_policy": {"refuse": ["localhost", "mx.test"]}}}


@pytest.fixture
def server(ingress_server):
    return ingress_server(POLICY)


def test_fully_qualified_names_and_address_literals_are_welcome(server):
    with server.smtp() as client:
        assert client.ehlo("mail.example.org")[0] == 250
        assert client.ehlo("[192.0.2.1]")[0] == 250


def test_bare_name_is_refused(server):
    with server.smtp() as client:
        assert client.ehlo("mailer") == (504, b"5.5.2 mailer: need a fully-qualified host name")


def test_refused_names_whatever_their_case(server):
    with server.raw() as client:
        assert client.reply()[0] == 220
        assert client.cmd("HELO LocalHost") == (550, "5.7.1 LocalHost: host name refused")
        assert client.cmd("EHLO mx.test") == (550, "5.7.1 mx.test: host name refused")


def test_settings_can_relax_the_policy(ingress_server):
    server = ingress_server({"plugins": {"hello_policy": {"require_fqdn": False}}})
    with server.smtp() as client:
        assert client.ehlo("mailer")[0] == 250


def test_installed_but_not_enabled_changes_nothing(ingress_server):
    server = ingress_server()  # no [plugins.hello_policy] section: the plugin is off
    with server.smtp() as client:
        assert client.ehlo("localhost")[0] == 250
