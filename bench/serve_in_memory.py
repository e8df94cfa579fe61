"""ingress with its spool threshold raised, so that every message is held whole in memory: the
"before" of streaming, for bench/streaming.py. Arguments as for ``ingress serve``."""

from __future__ import annotations

import sys

from ingress import cli, spool

if __name__ == "__main__":
    spool.MEMORY_LIMIT = int(sys.argv.pop(1))  # bytes kept in memory before spilling
    sys.exit(cli.main(sys.argv[1:]))
