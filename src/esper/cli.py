"""The ``esper`` command line. Bad input exits with status 2 and one clear line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from esper import __version__


class UsageError(Exception):
    """Bad user input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esper",
        description="Morphogenetic training: grow a network while it trains.",
    )
    parser.add_argument("--version", action="version", version=f"esper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show the slot grid and action space for a layout")
    info.add_argument("--rows", type=int, default=1)
    info.add_argument("--cols", type=int, default=3)
    return parser


def _cmd_info(args: argparse.Namespace) -> int:
    from esper.actions import ActionSpace
    from esper.slots import SlotConfig

    config = SlotConfig.for_grid(args.rows, args.cols)
    space = ActionSpace(config, blueprints=("placeholder",))
    print(f"slots ({config.num_slots}): {' '.join(config.slot_ids)}")
    print(f"action heads (op, slot, blueprint, blend): {space.head_sizes}")
    return 0


COMMANDS = {"info": _cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"esper: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esper: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
