import pytest
from ingress import Reply
from ingress.errors import ConfigError

import hello_policy


@pytest.fixture
def plugin(ingress_plugin):
    return ingress_plugin(hello_policy, {"refuse": ["localhost", "mx.test"]})


@pytest.mark.parametrize("name", ["mail.example.org", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_fully_qualified_names_and_address_literals_are_welcome(plugin, name):
    assert plugin.call("on_helo", verb="EHLO", hostname=name) is None


@pytest.mark.parametrize("name", ["mailer", "mailer.", ".mailer"])
def test_names_without_an_inner_dot_are_refused(plugin, name):
    assert plugin.call("on_helo", hostname=name) == Reply(
        504, "5.5.2", f"{name}: need a fully-qualified host name")


def test_the_list_is_compared_without_regard_to_case(plugin):
    assert plugin.call("on_helo", hostname="MX.Test") == Reply(
        550, "5.7.1", "MX.Test: host name refused")


def test_an_empty_section_gets_the_schema_defaults(ingress_plugin):
    plugin = ingress_plugin(hello_policy, {})
    assert plugin.settings == {"require_fqdn": True, "refuse": ["localhost"]}
    assert plugin.call("on_helo", hostname="localhost").code == 550


def test_a_misspelt_setting_is_an_error(ingress_plugin):
    with pytest.raises(ConfigError, match="/plugins/hello_policy/refus: unknown key 'refus'"):
        ingress_plugin(hello_policy, {"refus": ["localhost"]})


def test_a_name_no_client_could_give_is_an_error(ingress_plugin):
    with pytest.raises(ConfigError, match="/plugins/hello_policy/refuse/1: 'mx test' is not"):
        ingress_plugin(hello_policy, {"refuse": ["localhost", "mx test"]})
