"""``bentospec`` command line: models, profiles, benchmark, autotuner, lossless check.

Each command group's ``<command>_cli`` module registers its own sub-parser (``add_parser``) and
handler; this module only assembles them and dispatches.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bentospec import deploy_cli, models_cli, profiles_cli, tune_cli, verify_cli
from bentospec.bench import cli as bench_cli
from bentospec.bench import step_costs_cli
from bentospec.bench.prompt_plan import PromptPoolTooSmall
from bentospec.profile import ProfileError

#: Every command group's module, in the order ``bentospec --help`` lists them.
COMMANDS = (models_cli, profiles_cli, verify_cli, bench_cli, step_costs_cli, tune_cli, deploy_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bentospec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except (ProfileError, PromptPoolTooSmall) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
