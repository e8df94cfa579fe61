"""Haraka as a peer in the benchmark: install a pinned release from npm and configure it.

    python bench/haraka.py install          # once; bench/run.py also does it when asked for Haraka

Haraka is installed into a folder of its own outside the repository (default
``~/.cache/ingress-bench/haraka-<version>``, or ``$INGRESS_BENCH_HARAKA``), from the npm registry;
Node.js and npm come from the Debian packages ``nodejs`` and ``npm`` when they are missing. Each
benchmark run gets a fresh Haraka home folder: it listens on 127.0.0.1 only, accepts recipients
in the benchmark's domain (``rcpt_to.in_host_list``), discards every message it accepts
(``queue/discard``: it stores nothing, so it is a peer that pays no disk at all), logs warnings
only, and answers reverse DNS lookups of clients with a tiny local plugin, so that no packet
leaves the machine (Haraka would otherwise ask the system's resolver for every connection).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "3.3.4"
DEFAULT_HOME = Path.home() / ".cache" / "ingress-bench" / f"haraka-{VERSION}"

RDNS_PLUGIN = """\
// Written by ingress's bench/haraka.py: answer reverse DNS lookups at once and locally, so a
// benchmark on 127.0.0.1 never waits for (or sends a packet to) a DNS server.
exports.register = function () {
    this.register_hook('lookup_rdns', 'answer_locally')
}
exports.answer_locally = (next, connection) => next(OK, 'localhost')
"""


def install_dir() -> Path:
    return Path(os.environ.get("INGRESS_BENCH_HARAKA", DEFAULT_HOME))


def executable() -> Path:
    return install_dir() / "node_modules" / ".bin" / "haraka"


def ensure_node() -> None:
    if shutil.which("node") and shutil.which("npm"):
        return
    if os.geteuid() != 0:
        raise SystemExit("Haraka needs Node.js and npm: apt-get install nodejs npm")
    print("installing nodejs and npm (Debian packages)", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nodejs", "npm"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def ensure_installed() -> Path:
    """The path of the ``haraka`` command, installing Haraka first if needed."""
    target = executable()
    if target.exists():
        return target
    ensure_node()
    folder = install_dir()
    folder.mkdir(parents=True, exist_ok=True)
    print(f"installing Haraka {VERSION} into {folder}", file=sys.stderr, flush=True)
    # bounded: a registry that cannot be reached fails the install in minutes, not hours
    subprocess.run(["npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund",
                    "--loglevel=error", "--fetch-retries=2", "--fetch-timeout=60000",
                    f"Haraka@{VERSION}"], check=True, timeout=600)
    if not target.exists():
        raise SystemExit(f"npm installed Haraka, but {target} is missing")
    return target


def configure(home: Path, port: int, nodes: int, domain: str) -> None:
    """A Haraka home folder for one benchmark run: *nodes* worker processes (0: none, the
    master serves) on 127.0.0.1:*port*, mail for *domain* accepted and discarded."""
    # Haraka's own skeleton first (connection.ini and the rest it expects), then our settings.
    subprocess.run([str(ensure_installed()), "-i", str(home)], check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (home / "plugins").mkdir(exist_ok=True)
    (home / "plugins" / "bench_rdns.js").write_text(RDNS_PLUGIN)
    files = {
        "smtp.ini": f"[main]\nlisten=127.0.0.1:{port}\nnodes={nodes}\n",
        "log.ini": "[main]\nlevel=warn\ntimestamps=false\n",
        "plugins": "bench_rdns\nrcpt_to.in_host_list\nqueue/discard\n",
        "host_list": f"{domain}\n",
        "me": f"{domain}\n",
    }
    for name, text in files.items():
        (home / "config" / name).write_text(text)


def command(home: Path) -> tuple[list[str], dict]:
    """argv and environment that run Haraka in the foreground on *home*."""
    # queue/discard only discards when told to; this is how it is told for every message
    env = dict(os.environ, YES_REALLY_DO_DISCARD="1")
    return [str(ensure_installed()), "-c", str(home)], env


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        raise SystemExit(__doc__.split("\n\n")[1].strip())
    print(ensure_installed())
