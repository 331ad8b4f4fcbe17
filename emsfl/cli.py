"""`emsfl <role> ...`: one console command, each role imported only when asked for.

Lazy imports matter: `emsfl satellite ...` runs on a small board without torch,
and `emsfl orbit ...` needs neither torch nor gRPC servers.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with `main(argv) -> int`, one-line help)
ROLES: dict[str, tuple[str, str]] = {
    "orbit": ("orbit_service.cli", "satellite passes, emulated clock and link states over MQTT"),
    "satellite": ("satellite_node.cli", "the satellite node: gRPC Federation server and global model"),
    "ground": ("ground_node.cli", "a ground node: profiling, training and uplink of its cluster's experts"),
    "pki": ("emsfl.pki", "certificates for MQTT and gRPC TLS: init-ca, issue, rotate, show"),
    "lab": ("testbed.cli", "run a whole testbed locally (embedded broker, every role as a process)"),
    "dashboard": ("testbed.dashboard.cli", "watch a running testbed live in the browser (read-only by default)"),
}


def _usage() -> str:
    lines = ["usage: emsfl <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in ROLES.items()]
    lines += ["", "Run `emsfl <command> --help` for the options of each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] == "--version":
        from emsfl import __version__

        print(f"emsfl {__version__}")
        return 0
    command = args[0]
    if command not in ROLES:
        print(f"emsfl: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(ROLES[command][0])
    result: int = module.main(args[1:])
    return result


if __name__ == "__main__":
    raise SystemExit(main())
