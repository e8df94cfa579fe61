"""The ``ingress`` command: serve, check-config, schema, plugins, hash-password. Private to the
core."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import shutil
import sys
import time

from ingress import __version__, manager, process
from ingress import config as config_mod
from ingress.errors import IngressError


class BatchingHandler(logging.StreamHandler):
    """A stream handler that writes the lines logged during one event-loop iteration with one
    write. ingress logs a line per session and per message; a system call each would be a
    large part of a short session's cost. Outside a running loop (start-up, worker threads) a
    line is written at once, after any lines still pending, so the order is kept."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if len(self._pending) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                try:
                    self.stream.write(text)
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr gone: nothing sensible left to do with log lines


def lean_log_records() -> None:
    """Log records without what our formats never show: no caller lookup (a walk up the stack
    for file, line and function), no thread, process or task names, no ``getpid`` system call
    per record (the formatters fill in the pid this process had when it started or forked).
    Every log line of a busy server pays for these otherwise."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False


class TextFormatter(logging.Formatter):
    """``%(asctime)s`` formatted once per second, not once per line."""

    _second, _text = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        if record.process is None:
            record.process = process.pid  # lean_log_records: records carry none
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, time.strftime("%Y-%m-%d %H:%M:%S",
                                                             self.converter(second))
        return f"{self._text},{int(record.msecs):03d}"


class JSONFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": process.pid if record.process is None else record.process,
            "message": record.getMessage(),
        }
        for key, value in getattr(record, "fields", {}).items():  # logged with extra={"fields"}
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def event_loop_runner(use_uvloop: bool):
    """A function that runs a coroutine on a new event loop: uvloop's when it is installed
    (``pip install 'ingress[fast]'``) and wanted, else asyncio's."""
    uvloop = None
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
    if uvloop is None:
        return asyncio.run
    if sys.version_info >= (3, 11):
        def runner(coro):
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                return r.run(coro)
        return runner

    def runner_310(coro):
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return asyncio.run(coro)
    return runner_310


def _serve(args) -> int:
    from ingress import workers

    # Several workers count their metrics in shared files; prometheus_client must learn that
    # before its first import, which the config load brings.
    metrics_dir = workers.use_multiprocess_metrics() if workers.wanted(args.config) > 1 else None
    try:
        cfg = config_mod.load(args.config)
        from ingress.server import print_lines, run

        runner = event_loop_runner(not args.no_uvloop)
        logger = logging.getLogger("ingress")
        logger.info("event loop: %s", "asyncio" if runner is asyncio.run else "uvloop")
        for line in cfg.warnings:
            logger.warning("%s", line)
        if cfg.server["workers"] > 1:
            return workers.serve(cfg, print_lines, runner, metrics_dir)
        return runner(run(cfg, print_lines))
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_config(args) -> int:
    cfg = config_mod.load(args.file)  # None: the embedded default
    for line in cfg.warnings:
        print(line, file=sys.stderr)
    print(f"{cfg.source}: OK ({len(cfg.plugins)} plugins)")
    return 0


def _schema(args) -> int:
    # With a config: exactly the schema that file is checked against (the core, the builtins
    # and the third-party plugins it enables); without: every importable installed plugin.
    schema = config_mod.load(args.config).schema if args.config else config_mod.full_schema()
    json.dump(schema, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def _hash_password(args) -> int:
    """Read a password (asked twice on a terminal, else the first line of standard input) and
    print a hash for ``directory.users[].password_hash``."""
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("ingress: the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("ingress: empty password", file=sys.stderr)
        return 2
    if args.bcrypt:
        import bcrypt

        print(bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode())
    else:
        import argon2

        print(argon2.PasswordHasher().hash(password))  # argon2id, the library's defaults
    return 0


def _plugins(args) -> int:
    cfg = config_mod.load(args.config)  # None: the embedded default
    active = {i.name: i for i in cfg.plugins}
    rows = list(active.values())
    for name, info in sorted(manager.entry_point_infos().items()):
        if name not in active:
            state = f"broken: {info.error}" if info.error else "installed, not enabled"
            rows.append(manager.PluginInfo(name, f"{info.source} ({state})"))
    for info in rows:
        hooks = ", ".join(info.hooks) if info.hooks else "-"
        print(f"{info.name}\t{info.source}\t{hooks}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingress", description="Plugin-driven SMTP ingress server.")
    p.add_argument("--version", action="version", version=f"ingress {__version__}")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text (default) or one JSON object per line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", metavar="FILE",
                       help="config file (TOML, JSON, YAML); default: the embedded default")
    serve.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", metavar="FILE", nargs="?",
                       help="config file; default: the embedded default")
    check.set_defaults(func=_check_config)
    schema = sub.add_parser("schema", help="print the merged JSON Schema of the config file")
    schema.add_argument("--config", metavar="FILE",
                        help="the schema this config file is checked against (its plugins "
                             "only); default: core, builtins and every installed plugin")
    schema.set_defaults(func=_schema)
    hashing = sub.add_parser("hash-password",
                             help="print a password hash for directory.users[].password_hash")
    hashing.add_argument("--bcrypt", action="store_true", help="bcrypt instead of argon2id")
    hashing.set_defaults(func=_hash_password)
    plugins = sub.add_parser("plugins", help="list plugins and the hooks they implement")
    plugins.add_argument("--config", metavar="FILE")
    plugins.set_defaults(func=_plugins)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    lean_log_records()
    handler = BatchingHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if args.log_format == "json" else TextFormatter(
        "%(asctime)s ingress[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    try:
        return args.func(args)
    except IngressError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
