"""``bentospec bench`` (and the prompt and load options ``bentospec tune`` shares)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from bentospec.bench import __doc__ as BENCH_DOC
from bentospec.bench.prompt_plan import PromptReuse
from bentospec.bench.records import REQUESTS_PER_SLOT, WORKLOADS, BenchSettings, WorkloadName
from bentospec.bench.render import DOC_END, DOC_START, splice, write_report
from bentospec.bench.report import BenchReport
from bentospec.bench.runner import bench_targets, run_targets
from bentospec.dataset import HELDOUT_POOL, PromptCase, load_cases
from bentospec.settings import PROJECT_ROOT

DEFAULT_OUT = Path("bench-results")
#: Batch sizes measured unless ``--concurrency`` says otherwise (bench and tune): one
#: request, a small batch and a large one.
DEFAULT_CONCURRENCY = (1, 4, 16)


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """``"4"`` -> ``4``; zero, negatives and lists are refused (argparse type)."""
    values = int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def workload_list(text: str) -> list[WorkloadName]:
    """``"greedy,sampling"`` -> the workloads (argparse type)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected workloads among {', '.join(WORKLOADS)}, got {text!r}"
        )
    return names  # type: ignore[return-value]


def add_load_arguments(
    parser: argparse.ArgumentParser, concurrency: Sequence[int], rounds: int, prompts: Path
) -> None:
    """The prompt and load options bench and tune share; ``prompts`` is the default file."""
    default = str(prompts.relative_to(PROJECT_ROOT))
    parser.add_argument(
        "--prompts", metavar="FILE", default=default, help=f"JSONL prompt file (default: {default})"
    )
    parser.add_argument(
        "--prompt-reuse",
        choices=get_args(PromptReuse),
        default="unseen",
        help="unseen: a server gets each prompt at most once in its life, so no figure comes "
        "from a cache (prefix cache, suffix's global tree) that saw the request; repeated: "
        "every level cycles through the same prompts, the 'repeated documents' workload "
        "(default: unseen)",
    )
    parser.add_argument("--categories", nargs="*", default=[], help="e.g. rag code (default: all)")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: every prompt")
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="tokens per request at most (default: 128)"
    )
    parser.add_argument(
        "--concurrency",
        type=int_list,
        default=list(concurrency),
        help=f"comma-separated levels (default: {','.join(map(str, concurrency))})",
    )
    parser.add_argument(
        "--requests-per-slot",
        type=positive_int,
        default=REQUESTS_PER_SLOT,
        help="each level sends at least this many requests per concurrent slot, so that it "
        f"measures a steady batch more than its drain (default: {REQUESTS_PER_SLOT})",
    )
    parser.add_argument(
        "--workloads",
        type=workload_list,
        default=["greedy"],
        help="greedy (temperature 0, token totals checked across configs) and/or sampling "
        "(temperature 0.7, top_p 0.95, seeded per prompt); default: greedy",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help=f"interleaved rounds of all configs (default: {rounds})",
    )


def server_env(text: str) -> tuple[str, dict[str, str]]:
    """``LABEL:KEY=VALUE[,KEY=VALUE]`` as (label, environment)."""
    label, _, pairs = text.partition(":")
    items = [pair.partition("=") for pair in pairs.split(",") if pair]
    if not label or not items or any(not key or not sep for key, sep, _ in items):
        raise argparse.ArgumentTypeError(f"expected LABEL:KEY=VALUE[,KEY=VALUE], got {text!r}")
    return label, {key: value for key, _, value in items}


def load_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`BenchSettings` fields of the options :func:`add_load_arguments` added (and
    ``--prompts``), but ``rounds``, which tune sets per phase."""
    return {
        "prompts": args.prompts,
        "prompt_reuse": args.prompt_reuse,
        "categories": args.categories,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "requests_per_slot": args.requests_per_slot,
        "workloads": args.workloads,
    }


def selected_cases(args: argparse.Namespace) -> list[PromptCase]:
    """The prompt cases ``--prompts/--categories/--num-prompts`` select; exits if none.

    A relative ``--prompts`` missing from the working directory is read from the project's.
    """
    prompts = Path(args.prompts)
    if not prompts.is_absolute() and not prompts.exists():
        prompts = PROJECT_ROOT / prompts
    cases = load_cases(prompts, set(args.categories) or None, args.num_prompts)
    if not cases:
        raise SystemExit("error: no prompts selected: check --prompts, --categories, --num-prompts")
    return cases


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="tokens/s, TTFT, ITL and acceptance with vs without speculation, and vs vllm serve",
        description=BENCH_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        action="append",
        dest="profiles",
        metavar="NAME",
        help="profile to compare with no speculation; repeatable (default: cpu)",
    )
    add_load_arguments(parser, DEFAULT_CONCURRENCY, rounds=3, prompts=HELDOUT_POOL)
    parser.add_argument(
        "--peer",
        action="store_true",
        help="instead: the first --profile through `bentoml serve` vs vLLM's own OpenAI server "
        "with the same engine arguments (tokens/s ratio, TTFT delta)",
    )
    parser.add_argument(
        "--servers",
        action="store_true",
        help="every --profile through its own `bentoml serve` (list a profile without "
        "speculation as the baseline, e.g. cpu-nospec), all started once and kept alive, "
        "measured interleaved; with --peer, vLLM's own server too",
    )
    parser.add_argument(
        "--restart-servers",
        action="store_true",
        help="with --servers: start every server afresh each round instead of once (each "
        "round's servers then get the same unseen prompts)",
    )
    parser.add_argument(
        "--server-env",
        type=server_env,
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
        help="with --servers: start every server once per label with that environment, "
        "e.g. gomp:BENTOSPEC_CPU_PRELOAD=off; repeatable (speedups pair within a label)",
    )
    parser.add_argument(
        "--url",
        help="measure the running service at this URL (serving the first --profile) "
        "instead of in-process engines, or instead of starting one with --peer",
    )
    parser.add_argument(
        "--compare-service",
        action="store_true",
        help="also run the first --profile through `bentoml serve` (or --url) and report "
        "service/engine throughput",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output directory (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: re-render the Markdown and plot of a results.json",
    )
    parser.add_argument(
        "--doc",
        type=Path,
        help=f"also write the Markdown into this file between {DOC_START} and {DOC_END}",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Measure (or re-render), write the report; exit 1 if the run's checks failed."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else one line per probe and request
    if args.render is not None:
        report = BenchReport.model_validate_json(args.render.read_text(encoding="utf-8"))
        out = args.out or args.render.parent
    else:
        out = args.out or DEFAULT_OUT
        settings = BenchSettings(
            profiles=list(dict.fromkeys(args.profiles or ["cpu"])),
            **load_settings(args),
            rounds=args.rounds,
            peer=args.peer,
            servers=args.servers,
            restart_servers=args.restart_servers,
            compare_service=args.compare_service,
            url=args.url,
            server_env=dict(args.server_env),
            out=str(out),
        )
        cases = selected_cases(args)
        report = asyncio.run(
            run_targets(
                settings,
                bench_targets(settings),
                cases,
                checkpoint=lambda partial: write_report(partial, out),
            )
        )
    text = write_report(report, out)
    if args.doc is not None:
        args.doc.write_text(splice(args.doc.read_text(encoding="utf-8"), text), encoding="utf-8")
    print(text)
    if report.problems:
        print("error: the run's checks failed:", *report.problems, sep="\n  ", file=sys.stderr)
        return 1
    return 0
