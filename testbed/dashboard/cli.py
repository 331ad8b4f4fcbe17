"""`emsfl dashboard`: watch a running testbed (a lab or a field trial) live in the browser.

Read-only and bound to loopback by default. `--operator` enables the orbit service's operator commands
(link override, pause, resume, scale) for requests that carry the token printed at start.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import sys
from pathlib import Path

from emsfl.config import ConfigError, parse_host_port
from emsfl.errors import OneLineParser
from emsfl.runtime.tls import add_tls_flags, from_env, from_flags

PROG = "emsfl dashboard"
DEFAULT_LISTEN = "127.0.0.1:8765"


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="MQTT broker HOST:PORT of the testbed")
    parser.add_argument("--state", type=Path, help="the satellite node's state directory (strategy, commits, experts)")
    parser.add_argument("--run-dir", type=Path, help="a lab run directory: every role's events.jsonl, accuracy")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to serve on (default: {DEFAULT_LISTEN})")
    parser.add_argument("--operator", action="store_true", help="accept operator commands carrying the printed token")
    # a TLS broker: the dashboard's MQTT certificate (`monitor` for a read-only view; `operator` to send commands)
    add_tls_flags(parser)
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_hosts(port: int) -> frozenset[str]:
    return frozenset(f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]"))


def page_url(host: str, port: int, token: str | None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    # the token rides in the fragment: a browser never sends it to a server or a log
    return f"http://{shown}:{port}/" + (f"#token={token}" if token else "")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dashboard %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        args = _parser().parse_args(argv)
        host, port = parse_host_port(args.broker, "--broker")
        listen_host, listen_port = parse_host_port(args.listen, "--listen")
        tls = from_flags(args) or from_env(os.environ)
        for flag, path in (("--state", args.state), ("--run-dir", args.run_dir)):
            if path is not None and path.exists() and not path.is_dir():
                raise ConfigError(f"{flag}: {path} is not a directory")
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0

    from aiohttp import web

    from testbed.dashboard.server import DashboardOptions, make_app

    if not is_loopback(listen_host):
        print(f"{PROG}: serving on {listen_host} (not loopback): plain HTTP, anyone who reaches it sees the page")
    token = secrets.token_urlsafe(24) if args.operator else None
    allowed = loopback_hosts(listen_port) if is_loopback(listen_host) else frozenset()
    app = make_app(DashboardOptions(host, port, args.state, args.run_dir, token, allowed, tls))
    print(f"{PROG}: {page_url(listen_host, listen_port, token)}", flush=True)
    if token is not None:
        print(f"{PROG}: operator token {token} (header X-Emsfl-Token; the URL above carries it)", flush=True)
    else:
        print(f"{PROG}: read-only (start with --operator for link override, pause, resume, scale)", flush=True)
    try:
        web.run_app(app, host=listen_host, port=listen_port, print=None, handle_signals=True)
    except OSError as exc:
        print(f"{PROG}: cannot listen on {listen_host}:{listen_port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0
