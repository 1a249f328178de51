"""``bentospec tune``: measure speculation candidates on the user's prompts and hardware, then
write a profile with the best method, k and a per-batch-size schedule.

The best speculation depends on the prompts (ngram pays off where answers copy from the
prompt) and on the machine (verifying drafts stops paying once a batch fills the cores), so
it is measured, not guessed. Each candidate needs an engine of its own; the measuring is
:mod:`bentospec.bench`'s (same prompts, greedy load, counters and speedups).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import statistics
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import yaml
from pydantic import BaseModel

from bentospec import bench
from bentospec.dataset import PromptCase
from bentospec.profile import BatchSizeStep, Profile, SpeculativeSpec, load_profile

DEFAULT_K = (2, 3, 5, 7)
#: ngram lookup windows (min, max n-gram length): short matches often, long matches surely.
DEFAULT_WINDOWS = ((1, 3), (2, 5))
DEFAULT_CONCURRENCY = (1, 4, 16)
#: Fields that vary within one family of candidates (same method, draft and window).
_K_FIELDS = {"num_speculative_tokens", "num_speculative_tokens_per_batch_size"}


def candidate_name(spec: SpeculativeSpec) -> str:
    name = f"{spec.method}-k{spec.num_speculative_tokens}"
    if spec.prompt_lookup_max is not None:
        name += f"-n{spec.prompt_lookup_min or 1}-{spec.prompt_lookup_max}"
    return name


def candidates(
    profile: Profile, ks: Sequence[int], windows: Sequence[tuple[int, int]]
) -> list[Profile]:
    """ngram at every k and window (it needs no weights, so it fits any target), and the
    profile's own draft-based method at every k if it has one."""
    specs = [
        SpeculativeSpec(
            method="ngram", num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi
        )
        for lo, hi in windows
        for k in ks
    ]
    own = profile.speculative
    if own is not None and own.model is not None:
        specs += [
            SpeculativeSpec.model_validate(
                {**own.model_dump(exclude=_K_FIELDS), "num_speculative_tokens": k}
            )
            for k in ks
        ]
    return [
        profile.with_speculative(spec).model_copy(update={"name": candidate_name(spec)})
        for spec in specs
    ]


class LevelChoice(BaseModel):
    concurrency: int
    #: The best candidate's tokens/s over no speculation at this concurrency.
    best_speedup: float
    #: Its k, or 0 where even the best candidate was slower than no speculation.
    num_speculative_tokens: int


class TuneChoice(BaseModel):
    #: ``None``: no candidate beat no speculation at any level.
    speculative: SpeculativeSpec | None
    levels: list[LevelChoice]
    #: Mean over levels of the choice's speedup (1 where it does not speculate).
    expected_speedup: float


def batch_schedule(levels: Mapping[int, int], max_num_seqs: int) -> tuple[BatchSizeStep, ...]:
    """Batch sizes 1..max_num_seqs, each with the k of the nearest measured concurrency.

    Nearest on a log scale (ranges split at geometric means: levels 1, 4, 16 cover 1-2, 3-8,
    9-max), since throughput scales with the batch roughly geometrically; equal neighbours
    merge. Concurrency stands in for batch size: the engine batches what is in flight.
    """
    ordered = sorted(levels.items())
    steps: list[BatchSizeStep] = []
    start = 1
    for i, (level, k) in enumerate(ordered):
        last = i == len(ordered) - 1
        end = max_num_seqs if last else min(max_num_seqs, math.isqrt(level * ordered[i + 1][0]))
        if steps and steps[-1][2] == k:
            steps[-1] = (steps[-1][0], end, k)
        else:
            steps.append((start, end, k))
        start = end + 1
        if start > max_num_seqs:
            break
    return tuple(steps)


def _family_choice(
    spec: SpeculativeSpec, best: Mapping[int, tuple[float, int]], max_num_seqs: int
) -> TuneChoice:
    levels = [
        LevelChoice(concurrency=c, best_speedup=gain, num_speculative_tokens=k if gain > 1 else 0)
        for c, (gain, k) in sorted(best.items())
    ]
    expected = statistics.fmean(
        level.best_speedup if level.num_speculative_tokens else 1.0 for level in levels
    )
    top_k = max(level.num_speculative_tokens for level in levels)
    if top_k == 0:
        return TuneChoice(speculative=None, levels=levels, expected_speedup=expected)
    schedule = batch_schedule(
        {level.concurrency: level.num_speculative_tokens for level in levels}, max_num_seqs
    )
    speculative = SpeculativeSpec.model_validate(
        {
            **spec.model_dump(exclude=_K_FIELDS),
            "num_speculative_tokens": top_k,
            "num_speculative_tokens_per_batch_size": schedule,
        }
    )
    return TuneChoice(speculative=speculative, levels=levels, expected_speedup=expected)


def choose(rows: Sequence[bench.BenchRow], max_num_seqs: int) -> TuneChoice:
    """The best family (method, draft, window) with the best k at each measured concurrency.

    Only k varies with the batch size in vLLM, so a family is chosen as a whole: the one whose
    schedule has the highest mean speedup over the levels.
    """
    families: dict[str, tuple[SpeculativeSpec, dict[int, tuple[float, int]]]] = {}
    for row in rows:
        if row.speculative is None or row.speedup is None:
            continue
        _, best = families.setdefault(
            row.speculative.model_dump_json(exclude=_K_FIELDS), (row.speculative, {})
        )
        if row.speedup > best.get(row.concurrency, (-math.inf, 0))[0]:
            best[row.concurrency] = (row.speedup, row.speculative.num_speculative_tokens)
    if not families:
        raise ValueError("no speculative measurement has a no-speculation baseline to compare")
    options = [_family_choice(spec, best, max_num_seqs) for spec, best in families.values()]
    return max(options, key=lambda option: option.expected_speedup)


def tuned_profile(profile: Profile, choice: TuneChoice, name: str, prompts: str) -> Profile:
    return profile.with_speculative(choice.speculative).model_copy(
        update={
            "name": name,
            "description": f"{profile.description}; tuned by bentospec tune on {prompts}: "
            f"{bench.describe(choice.speculative)}",
        }
    )


class _ProfileDumper(yaml.SafeDumper):
    """Block style, but lists of scalars on one line, so a schedule step reads ``[1, 2, 7]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list[object]) -> yaml.SequenceNode:
    flow = not any(isinstance(item, list | dict) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ProfileDumper.add_representer(list, _represent_list)


def profile_yaml(profile: Profile, comment: str) -> str:
    """A profile file (the name is the file's stem), under ``comment`` as ``#`` lines."""
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    data = profile.model_dump(mode="json", exclude={"name"}, exclude_none=True)
    return header + yaml.dump(data, Dumper=_ProfileDumper, sort_keys=False)


def levels_table(choice: TuneChoice) -> str:
    return bench.markdown_table(
        ["concurrency", "best speedup", "k chosen"],
        (
            [str(lv.concurrency), f"{lv.best_speedup:.2f}x", str(lv.num_speculative_tokens)]
            for lv in choice.levels
        ),
    )


class TuneReport(BaseModel):
    command: str
    profile: str
    prompts: int
    started_at: datetime
    rows: list[bench.BenchRow]
    choice: TuneChoice
    out: str


async def measure(
    profile: Profile,
    cases: Sequence[PromptCase],
    ks: Sequence[int],
    windows: Sequence[tuple[int, int]],
    concurrency: Sequence[int],
    max_tokens: int,
) -> list[bench.BenchRow]:
    """No speculation and every candidate, through bench, one engine at a time."""
    runs = bench.engine_runs(candidates(profile, ks, windows))
    return await bench.measure(runs, cases, concurrency, max_tokens)


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
        help="measure speculation candidates on your prompts and write the best profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--profile", default="cpu", metavar="NAME", help="profile to tune (default: cpu)"
    )
    parser.add_argument(
        "--prompts", type=Path, required=True, metavar="FILE", help="JSONL in the dataset format"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="profile to write (default: bench-results/NAME-tuned.yaml)",
    )
    parser.add_argument(
        "--k",
        type=bench.int_list,
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
    bench.add_load_arguments(parser, DEFAULT_CONCURRENCY)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    out: Path = args.out or bench.DEFAULT_OUT / f"{profile.name}-tuned.yaml"
    cases = bench.selected_cases(args)
    command = "bentospec tune " + shlex.join(
        [
            *("--profile", profile.name, "--prompts", str(args.prompts), "--out", str(out)),
            *(("--categories", *args.categories) if args.categories else ()),
            *(("--num-prompts", str(args.num_prompts)) if args.num_prompts is not None else ()),
            *("--k", ",".join(map(str, args.k))),
            *("--windows", ",".join(f"{lo}:{hi}" for lo, hi in args.windows)),
            *("--max-tokens", str(args.max_tokens)),
            *("--concurrency", ",".join(map(str, args.concurrency))),
        ]
    )
    started = datetime.now(UTC)
    rows = asyncio.run(
        measure(profile, cases, args.k, args.windows, args.concurrency, args.max_tokens)
    )
    choice = choose(rows, profile.engine.max_num_seqs)
    tuned = tuned_profile(profile, choice, out.stem, args.prompts.name)
    levels = levels_table(choice)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        profile_yaml(
            tuned,
            f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC from {len(cases)} prompts.\n"
            f"Best measured speculation per concurrency (measurements: {out.stem}.json):\n"
            + levels,
        ),
        encoding="utf-8",
    )
    report = TuneReport(
        command=command,
        profile=profile.name,
        prompts=len(cases),
        started_at=started,
        rows=rows,
        choice=choice,
        out=str(out),
    )
    out.with_suffix(".json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    print(bench.results_table(rows), levels, sep="\n\n")
    print(
        f"\nchosen: {bench.describe(choice.speculative)}, mean speedup over levels "
        f"{choice.expected_speedup:.2f}x\nwrote {out} (serve it from a config directory: "
        f"BENTOSPEC_CONFIG_DIR={out.parent} --arg profile={out.stem})"
    )
    return 0
