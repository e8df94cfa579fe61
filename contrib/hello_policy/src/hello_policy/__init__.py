"""hello_policy: an ingress plugin that checks the name a client gives in HELO/EHLO."""

import json
from importlib import resources

from ingress import Reply, hookimpl


@hookimpl
def config_schema():
    text = resources.files(__name__).joinpath("schema.json").read_text("utf-8")
    return json.loads(text)


@hookimpl
def check_settings(settings):
    # A name with a space in it, or an empty one, can never come in HELO: surely a typo.
    return [(f"/refuse/{i}", f"{name!r} is not a name a client could give")
            for i, name in enumerate(settings["refuse"])
            if not name or any(c.isspace() for c in name)]


@hookimpl
def on_helo(hostname, settings):
    if hostname.lower() in (name.lower() for name in settings["refuse"]):
        return Reply(550, "5.7.1", f"{hostname}: host name refused")
    literal = hostname.startswith("[") and hostname.endswith("]")
    if settings["require_fqdn"] and not literal and "." not in hostname.strip("."):
        return Reply(504, "5.5.2", f"{hostname}: need a fully-qualified host name")
    return None  # no opinion: the next plugin, or the core, answers
