"""ingress: a plugin-driven SMTP ingress server.

The public surface for plugin authors is what this module exports: :data:`hookimpl` to mark
hook implementations, :class:`Reply` for decisions, and the types hooks receive. Modules whose
name starts with ``_`` are private; every other module's docstring says whether plugins may
import it.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("ingress")

from ingress.reply import Reply  # noqa: E402

__all__ = ["Reply", "__version__", "hookimpl"]
