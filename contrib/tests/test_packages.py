"""The contrib distributions as installed: entry points, requirements, package data.

tox installs them with ``--no-deps`` (ingress itself comes from this repository's wheel), so
their declared requirements are checked here against what is installed instead.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path

import ingress
import pytest
from packaging.requirements import Requirement

CONTRIB = {  # distribution: (plugin name, module)
    "ingress-ratelimit": ("ratelimit", "ingress_ratelimit"),
    "ingress-dnsbl": ("dnsbl", "ingress_dnsbl"),
    "ingress-greylist": ("greylist", "ingress_greylist"),
    "ingress-hello-policy": ("hello_policy", "hello_policy"),
    "ingress-amqp": ("amqp", "ingress_amqp"),
    "ingress-rspamd": ("rspamd", "ingress_rspamd"),
    "ingress-mailauth": ("mailauth", "ingress_mailauth"),
}


@pytest.mark.parametrize("dist", CONTRIB)
def test_requirements_are_met_by_what_is_installed(dist):
    for line in metadata.requires(dist) or []:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({"extra": "test"}):
            continue
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (dist, line)
    assert metadata.version("ingress-smtp") == ingress.__version__
    assert importlib.import_module("ingress.testing")  # our ingress, not PyPI's namesake


@pytest.mark.parametrize("dist", CONTRIB)
def test_entry_point_and_schema_are_installed(dist):
    name, module_name = CONTRIB[dist]
    [entry] = [ep for ep in metadata.distribution(dist).entry_points
               if ep.group == "ingress.plugins"]
    assert entry.name == name
    module = importlib.import_module(module_name)
    assert (Path(module.__file__).parent / "schema.json").is_file()
    assert entry.load().config_schema()["additionalProperties"] is False


@pytest.mark.parametrize("module_name", ["ingress_ratelimit", "ingress_dnsbl",
                                         "ingress_greylist", "ingress_amqp",
                                         "ingress_rspamd", "ingress_mailauth"])
def test_plugins_are_tested_as_installed_not_from_the_source_tree(module_name):
    path = Path(importlib.import_module(module_name).__file__).resolve()
    assert "site-packages" in path.parts, path
