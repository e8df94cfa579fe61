"""ingress builtin plugins: one module per documented setting (installed as ``ingress_plugins``).

Each module is an ordinary ingress plugin, registered through the same plugin manager as third-party
ones; its settings are ``[plugins.<module name>]``, validated by ``schemas/<module name>.json``.
"""
