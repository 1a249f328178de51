"""``bentospec tune``: measure speculation candidates and engine levers on part of the user's
prompts, then check the choice on the other part before writing it.

The best speculation depends on the prompts (ngram pays off where answers copy from the
prompt) and on the machine (verifying drafts stops paying once a batch fills the cores), so
it is measured, not guessed. Tuning and judging on the same prompts would flatter the choice:
the prompts are split into a tuning set (candidates measured, best k per concurrency chosen)
and a validation set, on which the tuned profile, the profile as it is and no speculation run
interleaved. The tuned settings replace the profile's only if they win on validation.

Levers: k and the ngram lookup window (per concurrency, giving a batch-size schedule), and the
engine levers ``max_num_batched_tokens`` and vLLM's CPU thread binding, each measured with and
without speculation since some speed up both. The measuring is :mod:`bentospec.bench`'s.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from bentospec.bench.figures import paired_speedups
from bentospec.bench.records import NO_SPEC, BenchRow
from bentospec.bench.render import describe, markdown_table, stats_table
from bentospec.bench.report import BenchReport
from bentospec.bench.runner import BenchConfig, EngineVariant, Target, engine_target, plan
from bentospec.cpu_host import HostClass
from bentospec.dataset import PromptCase
from bentospec.profile import (
    BatchSizeStep,
    Profile,
    SpeculativeSpec,
)

DEFAULT_K = (2, 3, 5, 7)
#: ngram lookup windows (min, max n-gram length): short matches often, long matches surely.
DEFAULT_WINDOWS = ((1, 3), (2, 5))
#: Fields that vary within one family of candidates (same method, draft and window).
_K_FIELDS = {"num_speculative_tokens", "num_speculative_tokens_per_batch_size", "host_schedules"}
#: Name of the tuned profile in the validation rounds.
TUNED = "tuned"


def candidate_name(spec: SpeculativeSpec) -> str:
    name = f"{spec.method}-k{spec.num_speculative_tokens}"
    if spec.prompt_lookup_max is not None:
        name += f"-n{spec.prompt_lookup_min or 1}-{spec.prompt_lookup_max}"
    return name


def candidates(
    profile: Profile, ks: Sequence[int], windows: Sequence[tuple[int, int]]
) -> list[BenchConfig]:
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
    return [BenchConfig(candidate_name(spec), profile.with_speculative(spec)) for spec in specs]


def split_cases(
    cases: Sequence[PromptCase], validation_fraction: float
) -> tuple[list[PromptCase], list[PromptCase]]:
    """Tuning and validation cases, the validation ones spread evenly over the list (so both
    sets sample every category of a mixed file); neither may be empty."""
    tuning: list[PromptCase] = []
    validation: list[PromptCase] = []
    for i, case in enumerate(cases):
        held = math.floor((i + 1) * validation_fraction) > math.floor(i * validation_fraction)
        (validation if held else tuning).append(case)
    if not tuning or not validation:
        raise ValueError(
            f"{len(cases)} prompts split at {validation_fraction:g} leave an empty "
            f"{'tuning' if not tuning else 'validation'} set: use more prompts"
        )
    return tuning, validation


class LevelChoice(BaseModel):
    concurrency: int
    #: The best candidate's median tokens/s over no speculation at this concurrency.
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


def choose(rows: Sequence[BenchRow], max_num_seqs: int, workload: str = "greedy") -> TuneChoice:
    """The best family (method, draft, window) with the best k at each measured concurrency,
    from the median paired speedups of the profile's own engine settings under ``workload``.

    Only k varies with the batch size in vLLM, so a family is chosen as a whole: the one whose
    schedule has the highest mean speedup over the levels.
    """
    specs = {r.config: r.speculative for r in rows if r.speculative is not None}
    families: dict[str, tuple[SpeculativeSpec, dict[int, tuple[float, int]]]] = {}
    for (config, _, variant, row_workload, level), gains in paired_speedups(rows).items():
        if variant or row_workload != workload:
            continue
        spec, gain = specs[config], statistics.median(gains)
        _, best = families.setdefault(spec.model_dump_json(exclude=_K_FIELDS), (spec, {}))
        if gain > best.get(level, (-math.inf, 0))[0]:
            best[level] = (gain, spec.num_speculative_tokens)
    if not families:
        raise ValueError("no speculative measurement has a no-speculation baseline to compare")
    options = [_family_choice(spec, best, max_num_seqs) for spec, best in families.values()]
    return max(options, key=lambda option: option.expected_speedup)


def for_host_class(
    current: SpeculativeSpec | None,
    chosen: SpeculativeSpec | None,
    host_class: HostClass,
    max_num_seqs: int,
) -> SpeculativeSpec | None:
    """``chosen`` (measured on a CPU of ``host_class``) as that class's schedule, the profile's
    other classes keeping what they ran.

    A verify step costs differently per CPU class, so a schedule measured on one class is
    written as ``host_schedules[host_class]``. Where ``chosen`` is another family (method,
    window, draft) than ``current``, or there is no ``current``, it replaces it for every class:
    vLLM runs one proposer. Where no candidate paid here, this class gets k=0 at every size.
    """

    def family(spec: SpeculativeSpec) -> dict[str, object]:
        return spec.model_dump(exclude=_K_FIELDS)

    if current is None or (chosen is not None and family(chosen) != family(current)):
        return chosen
    if chosen is None:
        schedule, k = ((1, max_num_seqs, 0),), current.num_speculative_tokens
    else:
        schedule = chosen.num_speculative_tokens_per_batch_size or (
            (1, max_num_seqs, chosen.num_speculative_tokens),
        )
        k = max(current.num_speculative_tokens, chosen.num_speculative_tokens)
    # The other classes keep their k: a raised maximum is pinned for them by the default.
    default = current.num_speculative_tokens_per_batch_size
    if default is None and k > current.num_speculative_tokens:
        default = ((1, max_num_seqs, current.num_speculative_tokens),)
    return current.model_copy(
        update={
            "num_speculative_tokens": k,
            "num_speculative_tokens_per_batch_size": default,
            "host_schedules": {**(current.host_schedules or {}), host_class: schedule},
        }
    )


def variants(batched_tokens: Sequence[int], binds: Sequence[str]) -> list[EngineVariant]:
    """Engine-lever variants: each ``max_num_batched_tokens`` value, and each CPU thread
    binding ``CORES:RESERVED`` (``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_NUM_OF_RESERVED_CPU``)."""
    found = [
        EngineVariant(name=f"batched-tokens={n}", engine={"max_num_batched_tokens": n})
        for n in batched_tokens
    ]
    for bind in binds:
        cores, _, reserved = bind.partition(":")
        env = {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": reserved or "0"}
        found.append(EngineVariant(name=f"bind={cores} reserved={reserved or '0'}", env=env))
    return found


def tuning_targets(
    profile: Profile,
    ks: Sequence[int],
    windows: Sequence[tuple[int, int]],
    levers: Sequence[EngineVariant],
) -> list[Target]:
    """No speculation and every candidate; each lever with and without the profile's own
    speculation."""
    targets = [engine_target(c) for c in plan(candidates(profile, ks, windows))]
    own = plan([BenchConfig.of(profile)])
    targets += [engine_target(c, lever) for lever in levers for c in own]
    return targets


def lever_table(rows: Sequence[BenchRow], profile_name: str, workload: str = "greedy") -> str:
    """Each lever's median tokens/s over the profile's own settings, with and without
    speculation, per concurrency."""
    tps: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r.workload == workload and r.config in (NO_SPEC, profile_name):
            tps[(r.variant, r.config, r.concurrency)].append(r.tokens_per_s)
    medians = {key: statistics.median(values) for key, values in tps.items()}
    cells = [
        [variant, config, str(level), f"{value:.1f}", f"{value / medians[('', config, level)]:.2f}"]
        for (variant, config, level), value in medians.items()
        if variant and ("", config, level) in medians
    ]
    headers = ["lever", "config", "concurrency", "tokens/s", "vs profile settings"]
    return markdown_table(headers, cells, text_columns=2)


class Validation(BaseModel):
    """The tuned profile and the profile as it is, on prompts the tuning never saw."""

    #: Median paired speedup over no speculation per concurrency.
    tuned: dict[int, float]
    current: dict[int, float]

    @property
    def wins(self) -> bool:
        return statistics.fmean(self.tuned.values()) > statistics.fmean(self.current.values())


def validation_result(rows: Sequence[BenchRow], profile_name: str, workload: str) -> Validation:
    """Speedups of :data:`TUNED` and ``profile_name``; a config without speculation scores 1."""
    gains = paired_speedups(rows)
    levels = sorted({r.concurrency for r in rows})

    def speedups(config: str) -> dict[int, float]:
        return {
            c: statistics.median(gains.get((config, "engine", "", workload, c), [1.0]))
            for c in levels
        }

    return Validation(tuned=speedups(TUNED), current=speedups(profile_name))


class TuneReport(BaseModel):
    command: str
    profile: str
    tuning: BenchReport
    choice: TuneChoice
    validation: BenchReport
    result: Validation
    out: str
    #: Whether the profile's catalogue file was rewritten with the tuned settings.
    applied: bool


def render(report: TuneReport) -> str:
    choice, result = report.choice, report.result
    return "\n\n".join(
        [
            f"Tuning on {len(report.tuning.prompt_ids)} prompts (ids "
            f"{', '.join(report.tuning.prompt_ids)}):",
            stats_table(report.tuning.stats),
            "Engine levers (median tokens/s; ratio to the profile's own settings):",
            lever_table(report.tuning.rows, report.profile),
            "Best speculation per concurrency on the tuning prompts:",
            markdown_table(
                ["concurrency", "best speedup", "k chosen"],
                (
                    [str(lv.concurrency), f"{lv.best_speedup:.2f}x", str(lv.num_speculative_tokens)]
                    for lv in choice.levels
                ),
            ),
            f"Chosen: {describe(choice.speculative)}. Validation on "
            f"{len(report.validation.prompt_ids)} other prompts:",
            stats_table(report.validation.stats),
            markdown_table(
                ["concurrency", f"{TUNED} speedup", f"{report.profile} speedup"],
                (
                    [str(c), f"{result.tuned[c]:.2f}x", f"{result.current[c]:.2f}x"]
                    for c in result.tuned
                ),
            ),
            f"Tuned {'wins' if result.wins else 'does not win'} on validation "
            f"(mean speedup {statistics.fmean(result.tuned.values()):.2f}x vs "
            f"{statistics.fmean(result.current.values()):.2f}x)"
            + (f"; {report.profile}'s catalogue file was rewritten." if report.applied else "."),
        ]
    )
