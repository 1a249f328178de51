"""What a benchmark run records, and the figures derived from it: medians and spreads over
rounds, paired speedups, peer ratios, the issue's targets and the run's consistency checks."""

from __future__ import annotations

import shlex
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, computed_field

from bentospec.bench.checks import GreedyAgreement, greedy_agreement, token_problems
from bentospec.bench.stats import Spread, percentile
from bentospec.cpu_host import CpuHost
from bentospec.cpu_runtime import LoadedRuntime
from bentospec.metrics import SpecCounters
from bentospec.profile import MODEL_FREE_METHODS, SpeculativeSpec

Via = Literal["engine", "service", "vllm"]
WorkloadName = Literal["greedy", "sampling"]
#: Label of a no-speculation baseline config.
NO_SPEC = "no-spec"
#: Targets from the issue: tokens/s over no speculation by concurrency (greedy, model-free
#: speculation), and this service over ``vllm serve`` with the same engine config.
SPEEDUP_TARGETS = {1: 2.0, 4: 1.2, 16: 1.0}
PEER_TARGET = 0.95


class Workload(BaseModel):
    """The sampling every request of a level uses."""

    name: WorkloadName
    temperature: float
    top_p: float


WORKLOADS: dict[str, Workload] = {
    # Greedy output is deterministic: configs must generate the same tokens (checked).
    "greedy": Workload(name="greedy", temperature=0.0, top_p=1.0),
    # What most applications send; acceptance under sampling is what users get.
    "sampling": Workload(name="sampling", temperature=0.7, top_p=0.95),
}


class ConfigId(BaseModel):
    """What one series of rows measured: a profile's speculation, reached one way."""

    #: The profile (or candidate) name, ``no-spec`` for a baseline.
    config: str
    via: Via
    model: str
    speculative: SpeculativeSpec | None
    #: Engine-setting variant (tune's levers); empty for the profile's own settings.
    variant: str = ""

    @property
    def label(self) -> str:
        return f"{self.config} [{self.variant}]" if self.variant else self.config

    @property
    def key(self) -> str:
        """``"label via via"``: how a report names the config (:attr:`BenchReport.configs`)."""
        return f"{self.label} via {self.via}"


class RequestCount(BaseModel):
    """What one request generated: its prompt, its token count and a digest of the tokens."""

    prompt: int
    tokens: int
    digest: str
    #: The generated token ids (empty in results written before they were kept).
    token_ids: list[int] = []


class BenchRow(ConfigId):
    """One config, one workload, one concurrency level, one round."""

    workload: WorkloadName
    round: int
    concurrency: int
    requests: list[RequestCount]
    #: Sum of the per-request token counts: the throughput's numerator.
    output_tokens: int
    #: The engine's ``vllm:generation_tokens`` delta over the level, read once settled.
    counter_tokens: int
    wall_s: float
    ttft_ms_p50: float | None
    ttft_ms_p95: float | None
    itl_ms_p50: float | None
    itl_ms_p95: float | None
    spec: SpecCounters
    #: 1-minute load average when the level ended: the machine's other work.
    load_avg: float
    #: OpenMP library and allocator of the engine core, where the bench could read them.
    runtime: LoadedRuntime | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


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


def target_checks(stats: Sequence[ConfigStats], ratios: Sequence[ViaRatio]) -> list[TargetCheck]:
    """The issue's targets against the medians measured (those the run has data for)."""
    checks = [
        TargetCheck(
            target=f"tokens/s vs no-spec at concurrency {s.concurrency}",
            config=s.label if s.via == "engine" else s.key,
            measured=s.speedup,
            threshold=SPEEDUP_TARGETS[s.concurrency],
        )
        for s in stats
        if s.speedup is not None
        and s.workload == "greedy"
        and s.concurrency in SPEEDUP_TARGETS
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


def summarize_level(
    config: ConfigId,
    workload: WorkloadName,
    round_: int,
    concurrency: int,
    records: Sequence[Any],
    wall_s: float,
    counter_tokens: int,
    spec: SpecCounters,
    load_avg: float,
    runtime: LoadedRuntime | None = None,
) -> BenchRow:
    """One level's request records (:class:`~bentospec.bench.stats.RequestRecord`) as a row."""
    ttft = [r.ttft_s * 1000 for r in records]
    itl = [x * 1000 for r in records for x in r.itl_s]
    return BenchRow(
        **config.model_dump(),
        workload=workload,
        round=round_,
        concurrency=concurrency,
        requests=[
            RequestCount(prompt=r.prompt, tokens=r.tokens, digest=r.digest, token_ids=r.token_ids)
            for r in records
        ],
        output_tokens=sum(r.tokens for r in records),
        counter_tokens=counter_tokens,
        wall_s=wall_s,
        ttft_ms_p50=percentile(ttft, 50),
        ttft_ms_p95=percentile(ttft, 95),
        itl_ms_p50=percentile(itl, 50),
        itl_ms_p95=percentile(itl, 95),
        spec=spec,
        load_avg=load_avg,
        runtime=runtime,
    )


class Provenance(BaseModel):
    """Which code measured, on what machine, under what load."""

    git_commit: str | None
    #: Uncommitted changes in the working tree when the run started.
    git_dirty: bool | None
    vllm_version: str | None
    bentoml_version: str | None
    cpu_count: int | None
    #: 1, 5 and 15-minute load averages at the start and the end of the run.
    load_avg_start: tuple[float, float, float]
    load_avg_end: tuple[float, float, float]
    #: ``VLLM_CPU_*`` settings of the environment (thread binding, reserved cores).
    env: dict[str, str]
    #: The CPU model and class (AVX2, AVX-512, AMX): what a verify step costs depends on it.
    #: ``None`` in results written before it was recorded.
    cpu: CpuHost | None = None


class BenchSettings(BaseModel):
    """What a run measures; :meth:`command` is the command line that reproduces it."""

    profiles: list[str] = ["cpu"]
    #: Prompt file in the dataset format; ``None`` is the committed dataset.
    prompts: str | None = None
    categories: list[str] = []
    num_prompts: int | None = None
    max_tokens: int = 128
    concurrency: list[int] = [1, 4, 16]
    workloads: list[WorkloadName] = ["greedy"]
    rounds: int = 3
    #: Measure the first speculative profile through ``bentoml serve`` against ``vllm serve``.
    peer: bool = False
    #: Every profile through its own ``bentoml serve``, all kept alive for the whole run.
    servers: bool = False
    #: Measure the first profile through ``bentoml serve`` against the in-process engine too.
    compare_service: bool = False
    #: A running service to measure (serving the first profile) instead of in-process engines.
    url: str | None = None
    #: With ``servers``: label -> environment; every server is started once per label with
    #: that environment (e.g. ``BENTOSPEC_CPU_PRELOAD=off``), and speedups pair within a label.
    server_env: dict[str, dict[str, str]] = {}
    out: str = "bench-results"

    def command(self) -> str:
        args = ["bentospec", "bench"]
        for name in self.profiles:
            args += ["--profile", name]
        if self.prompts is not None:
            args += ["--prompts", self.prompts]
        if self.categories:
            args += ["--categories", *self.categories]
        if self.num_prompts is not None:
            args += ["--num-prompts", str(self.num_prompts)]
        args += ["--max-tokens", str(self.max_tokens)]
        args += ["--concurrency", ",".join(map(str, self.concurrency))]
        args += ["--workloads", ",".join(self.workloads), "--rounds", str(self.rounds)]
        args += ["--url", self.url] if self.url is not None else []
        args += ["--peer"] if self.peer else []
        args += ["--servers"] if self.servers else []
        args += ["--compare-service"] if self.compare_service else []
        for label, env in self.server_env.items():
            args += ["--server-env", f"{label}:" + ",".join(f"{k}={v}" for k, v in env.items())]
        return shlex.join([*args, "--out", self.out])


class BenchReport(BaseModel):
    settings: BenchSettings
    #: Ids of the prompt cases, in the order the requests cycle through them.
    prompt_ids: list[str]
    provenance: Provenance
    #: Resolved engine arguments (and environment) of each config, by label.
    configs: dict[str, dict[str, Any]]
    started_at: datetime
    finished_at: datetime
    rows: list[BenchRow]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def stats(self) -> list[ConfigStats]:
        return config_stats(self.rows)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ratios(self) -> list[ViaRatio]:
        return [
            *via_ratios(self.rows, "service", "vllm"),
            *via_ratios(self.rows, "service", "engine"),
        ]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def targets(self) -> list[TargetCheck]:
        return target_checks(self.stats, self.ratios)

    @property
    def dtypes(self) -> dict[str, str]:
        """The dtype each config's engine ran, by ``"label via via"``."""
        return {
            label: str(setup["engine_args"]["dtype"])
            for label, setup in self.configs.items()
            if "dtype" in setup.get("engine_args", {})
        }

    @computed_field  # type: ignore[prop-decorator]
    @property
    def problems(self) -> list[str]:
        return token_problems(self.rows, self.dtypes)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def agreement(self) -> list[GreedyAgreement]:
        return greedy_agreement(self.rows, self.dtypes)
