"""`instructune COMMAND`: one module per command, and the one place where a UserError becomes a one-line
`error: ...` with exit status 2 (and where a distributed process ends cleanly).

Every command module has `HELP` (one line) and `main(argv) -> int`; commands raise UserError for
anything the user can fix and never print tracebacks for it.
"""

import importlib
import logging
import sys
from typing import Callable

from instructune.config.device import main_process
from instructune.errors import UserError
from instructune.training import distributed

COMMANDS = ("train", "demo", "plan", "generate", "serve", "eval", "judge", "data", "diff", "convert", "shard", "merge")


def setup_logging() -> None:
    logging.basicConfig(format="instructune: %(message)s", level=logging.WARNING)
    logging.getLogger("instructune").setLevel(logging.INFO if main_process() else logging.WARNING)
    # bitsandbytes (imported by peft) warns on import that an optional CPU kernel package is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def run(command: Callable[[], int]) -> int:
    """Run a command; a UserError is printed as one line (by the main process) and gives exit status 2.

    A process that joined a process group leaves through distributed.exit_process, which never returns.
    """
    setup_logging()
    try:
        code = command()
    except UserError as e:
        if main_process():
            print(f"error: {e}", file=sys.stderr)
        code = 2
    if distributed.is_initialized():
        distributed.exit_process(code)
    return code


def check_ranges(checks: list[tuple[str, float, float, float]]) -> None:
    """Each (flag, value, least, most): a value outside [least, most] (or NaN) is one line naming the flag."""
    from instructune.errors import ConfigError

    for flag, value, least, most in checks:
        if not least <= value <= most:
            raise ConfigError(f"{flag} {value:.10g}: must be between {least:.10g} and {most:.10g}")


def add_client_flags(parser, requests: str, timeout: float) -> None:
    """The judge endpoint's flags, shared by `data filter` and `judge` (read by client_from_flags)."""
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY", help="the environment variable holding the API key")
    parser.add_argument("--concurrency", type=int, default=8, help=f"{requests} in flight at once")
    parser.add_argument("--retries", type=int, default=5, help="retries on 429, 5xx, timeouts and replies cut short "
                        "(exponential backoff, or the server's Retry-After up to 2 minutes)")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per request, all of it (not per read)")


def client_from_flags(args, url: str, model: str, cache, **params):
    """A ChatClient from add_client_flags' flags, each checked."""
    import os

    from instructune.inference.client import ChatClient

    check_ranges([("--concurrency", args.concurrency, 1, 4096), ("--retries", args.retries, 0, 100),
                  ("--timeout", args.timeout, 0.001, 86400)])
    return ChatClient(url, model, os.environ.get(args.api_key_env), args.concurrency, args.retries, args.timeout,
                      cache=cache, **params)


def command_module(name: str):
    return importlib.import_module(f"instructune.cli.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: instructune COMMAND [flags]   (instructune COMMAND --help for its flags)\n\ncommands:")
        for name in COMMANDS:
            print(f"  {name:10s} {command_module(name).HELP}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = command_module(argv[0])
    return run(lambda: module.main(argv[1:]))


def entry() -> None:
    """The `instructune` command (and `python -m instructune.cli`)."""
    exit_with(main())


def train_main() -> None:
    """train.py: Alpaca's entry point, flags only."""
    exit_with(main(["train", *sys.argv[1:]]))


def weight_diff_main() -> None:
    """weight_diff.py: Alpaca's `make_diff` / `recover` command line."""
    exit_with(main(["diff", *sys.argv[1:]]))


def exit_with(code: int) -> None:
    """Leave the process with `code`, the garbage collector's objects frozen first: the interpreter's teardown
    otherwise runs collections over the hundreds of thousands of objects torch and transformers made, 1.5-2 s after
    every command has finished. atexit handlers, flushing and module teardown still run (os._exit would skip them)."""
    import gc

    gc.freeze()
    sys.exit(code)
