"""What a benchmark run records: the configs measured, one row per level and round, the
settings of the run and where it ran. Figures derived from the rows: :mod:`.figures`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, computed_field

from bentospec.bench.prompt_plan import PromptReuse
from bentospec.bench.stats import percentile
from bentospec.cpu_host import CpuHost
from bentospec.cpu_runtime import LoadedRuntime
from bentospec.metrics import SpecCounters
from bentospec.profile import SpeculativeSpec

Via = Literal["engine", "service", "vllm"]
WorkloadName = Literal["greedy", "sampling"]
#: Label of a no-speculation baseline config.
NO_SPEC = "no-spec"


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


#: See :attr:`BenchSettings.requests_per_slot`.
REQUESTS_PER_SLOT = 4


class BenchSettings(BaseModel):
    """What a run measures (:func:`bentospec.bench.commands.bench_command` reproduces it)."""

    profiles: list[str] = ["cpu"]
    #: Prompt file in the dataset format; ``None`` is the committed dataset.
    prompts: str | None = None
    categories: list[str] = []
    num_prompts: int | None = None
    max_tokens: int = 128
    concurrency: list[int] = [1, 4, 16]
    #: Requests per slot a level sends at least (``max(prompts, this x concurrency)``). The
    #: level's wall time ends with its slowest slot, which on a mixed set is a slot whose
    #: requests speculation cannot shorten: with 2 per slot that drain was most of a level,
    #: and the level measured one batch's makespan rather than a service's throughput.
    requests_per_slot: int = REQUESTS_PER_SLOT
    #: ``unseen``: a server gets each prompt at most once in its life, so no figure comes from
    #: a cache that saw the request; ``repeated``: the "repeated documents" workload
    #: (:mod:`bentospec.bench.prompt_plan`). Results written before it was recorded repeated.
    prompt_reuse: PromptReuse = "unseen"
    workloads: list[WorkloadName] = ["greedy"]
    rounds: int = 3
    #: Measure the first speculative profile through ``bentoml serve`` against ``vllm serve``.
    peer: bool = False
    #: Every profile through its own ``bentoml serve``, all kept alive for the whole run.
    servers: bool = False
    #: With ``servers``: start them afresh every round instead (a fresh server has seen no
    #: prompt, so ``unseen`` needs one round's prompts, not every round's).
    restart_servers: bool = False
    #: Measure the first profile through ``bentoml serve`` against the in-process engine too.
    compare_service: bool = False
    #: A running service to measure (serving the first profile) instead of in-process engines.
    url: str | None = None
    #: With ``servers``: label -> environment; every server is started once per label with
    #: that environment (e.g. ``BENTOSPEC_CPU_PRELOAD=off``), and speedups pair within a label.
    server_env: dict[str, dict[str, str]] = {}
    out: str = "bench-results"

    @property
    def keeps_servers(self) -> bool:
        """Whether the run starts its servers once and keeps them up for every round."""
        return self.servers and not self.restart_servers

    @property
    def servers_outlive_rounds(self) -> bool:
        """Whether the servers measured stay up from round to round (a running ``url`` too)."""
        return self.keeps_servers or self.url is not None
