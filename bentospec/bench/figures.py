"""Figures derived from a run's rows: medians and spreads over rounds, paired speedups over
no speculation, ratios between ways of reaching a config, and the issue's targets."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, computed_field

from bentospec.bench.records import BenchRow, ConfigId, Via, WorkloadName
from bentospec.bench.stats import Spread
from bentospec.metrics import SpecCounters
from bentospec.profile import MODEL_FREE_METHODS

#: Targets from the issue: tokens/s over no speculation by concurrency (greedy, model-free
#: speculation) on prompts that copy from their documents (RAG alone), and this service over
#: ``vllm serve`` with the same engine config.
SPEEDUP_TARGETS = {1: 2.0, 4: 1.3, 16: 1.0}
PEER_TARGET = 0.97
#: The prompt categories whose answers copy from the prompt, where :data:`SPEEDUP_TARGETS` apply.
COPYING_CATEGORIES = frozenset({"rag"})
#: On any other set (RAG with open chat, or every category): never slower than no speculation,
#: within noise, at every level.
NEVER_SLOWER_TARGET = 0.98


def speedup_targets(categories: Iterable[str], levels: Iterable[int]) -> dict[int, float]:
    """The speedup each concurrency level must reach on a prompt set of ``categories`` (none
    listed: every category of the prompt file, a mixed set)."""
    chosen, measured = set(categories), set(levels)
    if chosen and chosen <= COPYING_CATEGORIES:
        return {c: t for c, t in SPEEDUP_TARGETS.items() if c in measured}
    return dict.fromkeys(measured, NEVER_SLOWER_TARGET)


def _key(row: BenchRow) -> tuple[str, Via, str, str, int]:
    return row.config, row.via, row.variant, row.workload, row.concurrency


def paired_speedups(rows: Sequence[BenchRow]) -> dict[tuple[str, Via, str, str, int], list[float]]:
    """Speculative tokens/s over the baseline of the same round (model, via, variant, workload,
    concurrency): configs of a round ran minutes apart at most, so the load they saw is alike."""
    baseline = {
        (r.model, r.via, r.variant, r.workload, r.concurrency, r.round): r.tokens_per_s
        for r in rows
        if r.speculative is None
    }
    gains: dict[tuple[str, Via, str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        base = baseline.get((r.model, r.via, r.variant, r.workload, r.concurrency, r.round))
        if r.speculative is not None and base:
            gains[_key(r)].append(r.tokens_per_s / base)
    return gains


class ConfigStats(ConfigId):
    """One config at one workload and concurrency over all rounds."""

    workload: WorkloadName
    concurrency: int
    tokens_per_s: Spread
    #: Paired speedups over no speculation; ``None`` for baselines and unpaired configs.
    speedup: Spread | None
    ttft_ms_p50: Spread | None
    itl_ms_p50: Spread | None
    #: Spec-decode counts summed over the rounds.
    spec: SpecCounters
    load_avg: Spread
    #: Output tokens per round (equal across rounds and configs for greedy runs).
    tokens: list[int]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def acceptance_rate(self) -> float | None:
        return self.spec.acceptance_rate

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mean_acceptance_length(self) -> float | None:
        return self.spec.mean_acceptance_length


def _spread(values: Iterable[float | None]) -> Spread | None:
    present = [v for v in values if v is not None]
    return Spread.of(present) if present else None


def total_spec(spans: Iterable[SpecCounters]) -> SpecCounters:
    spans = list(spans)
    return SpecCounters(
        drafts=sum(s.drafts for s in spans),
        draft_tokens=sum(s.draft_tokens for s in spans),
        accepted_tokens=sum(s.accepted_tokens for s in spans),
    )


def config_stats(rows: Sequence[BenchRow]) -> list[ConfigStats]:
    """Rows grouped over rounds, in the order configs first appear."""
    groups: dict[tuple[str, Via, str, str, int], list[BenchRow]] = defaultdict(list)
    for row in rows:
        groups[_key(row)].append(row)
    gains = paired_speedups(rows)
    return [
        ConfigStats(
            **group[0].model_dump(include=set(ConfigId.model_fields)),
            workload=group[0].workload,
            concurrency=group[0].concurrency,
            tokens_per_s=Spread.of(r.tokens_per_s for r in group),
            speedup=_spread(gains.get(key, [])),
            ttft_ms_p50=_spread(r.ttft_ms_p50 for r in group),
            itl_ms_p50=_spread(r.itl_ms_p50 for r in group),
            spec=total_spec(r.spec for r in group),
            load_avg=Spread.of(r.load_avg for r in group),
            tokens=[r.output_tokens for r in group],
        )
        for key, group in sorted(groups.items(), key=lambda kv: (kv[0][3], kv[0][4]))
    ]


class ViaRatio(BaseModel):
    """One config reached two ways (this service vs ``vllm serve`` or the bare engine),
    paired round by round."""

    config: str
    workload: WorkloadName
    concurrency: int
    via: Via
    against: Via
    #: tokens/s via ``via`` over tokens/s via ``against``.
    ratio: Spread
    #: TTFT p50 via ``via`` minus via ``against``, ms.
    ttft_delta_ms: Spread | None


def via_ratios(rows: Sequence[BenchRow], via: Via, against: Via) -> list[ViaRatio]:
    index = {(r.config, r.variant, r.workload, r.concurrency, r.round, r.via): r for r in rows}
    pairs: dict[tuple[str, str, int], list[tuple[BenchRow, BenchRow]]] = defaultdict(list)
    for (config, variant, workload, level, rnd, row_via), row in index.items():
        other = index.get((config, variant, workload, level, rnd, against))
        if row_via == via and other is not None:
            pairs[(config, workload, level)].append((row, other))
    return [
        ViaRatio(
            config=config,
            workload=workload,  # type: ignore[arg-type]
            concurrency=level,
            via=via,
            against=against,
            ratio=Spread.of(a.tokens_per_s / b.tokens_per_s for a, b in group),
            ttft_delta_ms=_spread(
                a.ttft_ms_p50 - b.ttft_ms_p50
                for a, b in group
                if a.ttft_ms_p50 is not None and b.ttft_ms_p50 is not None
            ),
        )
        for (config, workload, level), group in pairs.items()
    ]


class TargetCheck(BaseModel):
    target: str
    config: str
    measured: Spread
    threshold: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def met(self) -> bool:
        return self.measured.median >= self.threshold


def target_checks(
    stats: Sequence[ConfigStats], ratios: Sequence[ViaRatio], categories: Sequence[str]
) -> list[TargetCheck]:
    """The issue's targets for a prompt set of ``categories`` against the medians measured
    (those the run has data for)."""
    targets = speedup_targets(categories, {s.concurrency for s in stats})
    checks = [
        TargetCheck(
            target=f"tokens/s vs no-spec at concurrency {s.concurrency}",
            config=s.label if s.via == "engine" else s.key,
            measured=s.speedup,
            threshold=targets[s.concurrency],
        )
        for s in stats
        if s.speedup is not None
        and s.workload == "greedy"
        and s.concurrency in targets
        and s.speculative is not None
        and s.speculative.method in MODEL_FREE_METHODS
    ]
    checks += [
        TargetCheck(
            target=f"service vs vllm serve tokens/s at concurrency {r.concurrency}",
            config=r.config,
            measured=r.ratio,
            threshold=PEER_TARGET,
        )
        for r in ratios
        if r.against == "vllm" and r.workload == "greedy"
    ]
    return checks
