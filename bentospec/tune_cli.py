"""``bentospec tune``'s command line: arguments, the tuning and validation runs, the files.

What to measure and how to choose is :mod:`bentospec.tune`'s; this module drives it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from datetime import UTC, datetime
from pathlib import Path

from bentospec import tune
from bentospec.bench import cli as bench_cli
from bentospec.bench.commands import tune_command
from bentospec.bench.records import BenchSettings
from bentospec.bench.render import describe
from bentospec.bench.runner import BenchConfig, engine_target, plan, plan_for, run_targets
from bentospec.dataset import TUNE_POOL
from bentospec.profile import load_profile, profile_path, profile_yaml
from bentospec.tune import (
    DEFAULT_K,
    DEFAULT_WINDOWS,
    TUNED,
    TuneReport,
    choose,
    for_host_class,
    render,
    split_cases,
    tuning_targets,
    validation_result,
    variants,
)


def window_list(text: str) -> list[tuple[int, int]]:
    """``"1:3,2:5"`` -> ``[(1, 3), (2, 5)]`` (argparse type)."""
    try:
        windows = [(int(lo), int(hi)) for lo, hi in (part.split(":") for part in text.split(","))]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX[,MIN:MAX...]: {text!r}") from exc
    if not all(1 <= lo <= hi for lo, hi in windows):
        raise argparse.ArgumentTypeError(f"each window needs 1 <= MIN <= MAX: {text!r}")
    return windows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="tune speculation on part of your prompts, validate on the rest, write the profile",
        description=tune.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--profile", default="cpu", metavar="NAME", help="profile to tune (default: cpu)"
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.5,
        help="share of the prompts held out for validation (default: 0.5)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="tuned profile to write (default: bench-results/NAME-tuned.yaml)",
    )
    parser.add_argument(
        "--apply",
        action="store_true",
        help="rewrite the profile's catalogue file with the tuned settings if they win on "
        "validation",
    )
    parser.add_argument(
        "--k",
        type=bench_cli.int_list,
        default=list(DEFAULT_K),
        help=f"num_speculative_tokens to try (default: {','.join(map(str, DEFAULT_K))})",
    )
    parser.add_argument(
        "--windows",
        type=window_list,
        default=list(DEFAULT_WINDOWS),
        help="ngram lookup windows MIN:MAX to try (default: "
        f"{','.join(f'{lo}:{hi}' for lo, hi in DEFAULT_WINDOWS)})",
    )
    parser.add_argument(
        "--batched-tokens",
        type=bench_cli.int_list,
        default=[],
        help="max_num_batched_tokens values to try, with and without speculation",
    )
    parser.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="CORES:RESERVED",
        help="CPU thread binding to try, e.g. 0-1:0 (both cores, none reserved); repeatable",
    )
    parser.add_argument(
        "--validation-rounds",
        type=int,
        default=3,
        help="interleaved rounds on the validation prompts (default: 3)",
    )
    bench_cli.add_load_arguments(parser, bench_cli.DEFAULT_CONCURRENCY, rounds=1, prompts=TUNE_POOL)
    parser.set_defaults(handler=run)


def _settings(args: argparse.Namespace, rounds: int, out: Path) -> BenchSettings:
    return BenchSettings(
        profiles=[args.profile],
        **bench_cli.load_settings(args),
        rounds=rounds,
        out=str(out.parent),
    )


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    out: Path = args.out or bench_cli.DEFAULT_OUT / f"{profile.name}-tuned.yaml"
    tuning_cases, validation_cases = split_cases(
        bench_cli.selected_cases(args), args.validation_fraction
    )
    command = tune_command(_settings(args, args.rounds, out), args, out)
    # Refused now rather than after the tuning phase: the validation prompts must suffice.
    plan_for(_settings(args, args.validation_rounds, out), len(validation_cases))
    started = datetime.now(UTC)
    workload = args.workloads[0]
    tuning = asyncio.run(
        run_targets(
            _settings(args, args.rounds, out),
            tuning_targets(profile, args.k, args.windows, variants(args.batched_tokens, args.bind)),
            tuning_cases,
        )
    )
    choice = choose(tuning.rows, profile.engine.max_num_seqs, workload)
    speculative = choice.speculative
    if (host_class := profile.hardware.host_class()) is not None:
        speculative = for_host_class(
            profile.speculative, speculative, host_class, profile.engine.max_num_seqs
        )
    tuned = profile.with_speculative(speculative).model_copy(
        update={
            "name": out.stem,
            "description": f"{profile.description}; tuned by bentospec tune: "
            f"{describe(choice.speculative)}",
        }
    )
    # A tuned profile without speculation is the baseline itself: its speedup is 1.
    contenders = plan([BenchConfig.of(profile)])
    if choice.speculative is not None:
        contenders.append(BenchConfig(TUNED, tuned))
    validation = asyncio.run(
        run_targets(
            _settings(args, args.validation_rounds, out),
            [engine_target(c) for c in contenders],
            validation_cases,
        )
    )
    result = validation_result(validation.rows, profile.name, workload)
    header = (
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC; measurements in {out.stem}.json."
        f"\nValidation on {len(validation_cases)} held-out prompts: tuned "
        f"{statistics.fmean(result.tuned.values()):.2f}x, {profile.name} as it was "
        f"{statistics.fmean(result.current.values()):.2f}x (mean speedup over concurrency "
        f"{', '.join(map(str, result.tuned))})."
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_yaml(tuned, header), encoding="utf-8")
    applied = args.apply and result.wins
    if applied:
        target = profile_path(profile.name)
        target.write_text(
            profile_yaml(tuned.model_copy(update={"name": profile.name}), header),
            encoding="utf-8",
        )
    report = TuneReport(
        command=command,
        profile=profile.name,
        tuning=tuning,
        choice=choice,
        validation=validation,
        result=result,
        out=str(out),
        applied=applied,
    )
    out.with_suffix(".json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    text = render(report)
    out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nwrote {out} (serve it: BENTOSPEC_CONFIG_DIR={out.parent} --arg profile={out.stem})")
    problems = [*tuning.problems, *validation.problems]
    if problems:
        print("error: the run's checks failed:", *problems, sep="\n  ")
        return 1
    return 0
