"""``bentospec step-costs``' command line: options in, report files out.

What is measured and how is :mod:`bentospec.bench.step_cost`'s (its docstring is the command's
description).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bentospec.bench import step_cost
from bentospec.bench.cli import int_list
from bentospec.profile import load_profile

DEFAULT_OUT = Path("bench-results/step-costs")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "step-costs",
        help="time an engine step with and without drafts, and the GEMMs inside it",
        description=step_cost.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", default="cpu-nospec", help="target and engine settings")
    parser.add_argument(
        "--k", type=int_list, default=[5], help="drafts per step to time, beside none (k=0)"
    )
    parser.add_argument("--batch", type=int_list, default=[1, 4, 16], help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    report = step_cost.measure(
        load_profile(args.profile), [0, *args.k], args.batch, args.max_tokens
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step-costs.json").write_text(report.model_dump_json(indent=2) + "\n")
    text = step_cost.render(report)
    (args.out / "step-costs.md").write_text(text)
    print(text)
    return 0
