"""`emsfl <role> ...`: one console command, each role imported only when asked for.

Lazy imports matter: `emsfl satellite ...` runs on a small board without torch,
and `emsfl orbit ...` needs neither torch nor gRPC servers.
"""

from __future__ import annotations

import importlib
import os
import sys

from emsfl.errors import EXIT_USAGE, UserError
from emsfl.logs import VERBOSE_ENV

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
    lines = ["usage: emsfl [-v|-vv] <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in ROLES.items()]
    lines += ["", "-v: more log output (INFO for one-shot commands), -vv: DEBUG."]
    lines += ["Run `emsfl <command> --help` for the options of each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _take_verbosity(list(sys.argv[1:] if argv is None else argv))
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] == "--version":
        from emsfl import __version__

        print(f"emsfl {__version__}")
        return 0
    command = args[0]
    if command not in ROLES:
        print(f"emsfl: unknown command {command!r} (commands: {', '.join(ROLES)}; see emsfl --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        module = importlib.import_module(ROLES[command][0])
        result: int = module.main(args[1:])
        sys.stdout.flush()  # a closed reader shows up here, not in the interpreter's exit
    except SystemExit as exc:  # argparse: `--help` (0) or a one-line usage error (2, already printed)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        return _fail(command, str(exc.code))  # sys.exit("message")
    except BrokenPipeError:
        return _reader_gone()
    except UserError as exc:
        return _fail(command, str(exc))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        return _fail(command, f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
    return result


def _take_verbosity(args: list[str]) -> list[str]:
    """`emsfl -v|-vv|--verbose <command> ...`: the level goes to the environment, which started roles inherit."""
    level = 0
    while args and args[0] in {"-v", "-vv", "--verbose"}:
        level += 2 if args.pop(0) == "-vv" else 1
    if level:
        os.environ[VERBOSE_ENV] = str(level)
    return args


def _fail(command: str, message: str) -> int:
    """One line on stderr, exit 2: the message (a YAML error spans lines) joined onto one line."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    prefix = "" if line.startswith("emsfl") else f"emsfl {command}: "
    print(prefix + line, file=sys.stderr)
    return EXIT_USAGE


def _reader_gone() -> int:
    """stdout's reader closed early (`... | head`): stop quietly, as `cat` would.

    Later writes (the interpreter flushes stdout at exit) go to /dev/null instead of raising again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
