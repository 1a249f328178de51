"""``bentospec bench``: tokens/s, TTFT, inter-token latency and acceptance, with and without
speculation, at several concurrency levels, on an in-process engine or through the service.

Choices that make the figures comparable:

* Every config runs the same rendered prompts, greedy (temperature 0): greedy is what CPU
  speculation serves exactly, and ``top_k`` is never sent (it crashes vLLM 0.32's CPU
  rejection sampler).
* Output tokens/s is the engine's ``vllm:generation_tokens`` counter (EOS included) over the
  level's wall time, read in-process or from ``/metrics``: the service's text stream cannot
  count tokens exactly, the counter can, so engine and service figures are the same measure.
* Inter-token latency is per token: a stream chunk carrying n tokens after a gap g counts as n
  latencies of g/n. Speculation emits several tokens per step, and per-chunk gaps would make
  it look slower per token than it is.
* Engines start one at a time and are shut down before the next: two cores cannot host two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, computed_field

from bentospec.auth import API_KEY_ENV
from bentospec.dataset import PromptCase, load_cases, render_cases
from bentospec.engine import SpecEngine
from bentospec.generation import stream_outputs
from bentospec.metrics import SpecCounters
from bentospec.model_store import resolve_model
from bentospec.profile import MODEL_FREE_METHODS, Profile, SpeculativeSpec, load_profile
from bentospec.schemas import GenerateRequest, SamplingOptions

if TYPE_CHECKING:
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
DEFAULT_OUT = Path("bench-results")
LOG_DIR = PROJECT_ROOT / "build"
GENERATION_TOKENS = "vllm:generation_tokens"
#: Label of the no-speculation baseline config.
NO_SPEC = "no-spec"
#: Short warm-up generations: a fresh engine's first batches pay one-off costs.
WARMUP_MAX_TOKENS = 8
#: Markers in a document between which ``--doc`` splices the rendered results.
DOC_START, DOC_END = "<!-- bench:start -->", "<!-- bench:end -->"

#: Targets from the issue, checked in the report's summary.
TARGET_SPEEDUP_AT_1 = 2.0
TARGET_SPEEDUP_AT_MAX = 0.95
TARGET_SERVICE_RATIO = 0.95

Via = Literal["engine", "service"]


# --- measurements -------------------------------------------------------------------------


class Counters(BaseModel):
    """The engine counters a level is measured by: generated tokens and spec-decode counts."""

    model_config = ConfigDict(frozen=True)

    generation_tokens: int = 0
    spec: SpecCounters = SpecCounters()

    def __sub__(self, earlier: Counters) -> Counters:
        return Counters(
            generation_tokens=self.generation_tokens - earlier.generation_tokens,
            spec=self.spec - earlier.spec,
        )

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[str, float]]) -> Counters:
        """From (metric name, value) samples, summed over label sets like ``SpecCounters``."""
        samples = list(samples)
        tokens = sum(v for n, v in samples if n.removesuffix("_total") == GENERATION_TOKENS)
        return cls(generation_tokens=int(tokens), spec=SpecCounters.from_samples(samples))


class RequestRecord(BaseModel):
    """One request's timing as its client saw the stream."""

    ttft_s: float
    #: Per-token inter-token latencies after the first chunk (see the module docstring).
    itl_s: list[float]


def record_from_chunks(start: float, chunks: Sequence[tuple[float, int]]) -> RequestRecord:
    """A record from a stream's (arrival time, tokens carried) chunks; empty chunks are skipped."""
    chunks = [c for c in chunks if c[1] > 0]
    if not chunks:
        raise ValueError("the stream carried no tokens")
    itl = [
        (arrival - previous) / tokens
        for (previous, _), (arrival, tokens) in pairwise(chunks)
        for _ in range(tokens)
    ]
    return RequestRecord(ttft_s=chunks[0][0] - start, itl_s=itl)


def token_chunks(
    pieces: Sequence[tuple[float, str]], count_tokens: Callable[[str], int]
) -> list[tuple[float, int]]:
    """Text chunks to token chunks: each carries the growth of the token count of the text so far.

    Tokenizing the text so far, not each piece, keeps a word split across pieces one token;
    the count is kept monotone so that a re-merge never yields a negative chunk.
    """
    chunks: list[tuple[float, int]] = []
    text, seen = "", 0
    for arrival, piece in pieces:
        text += piece
        total = max(seen, count_tokens(text))
        chunks.append((arrival, total - seen))
        seen = total
    return chunks


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolated linearly between ranks as numpy does."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def speedup(tokens_per_s: float, baseline_tokens_per_s: float | None) -> float | None:
    return tokens_per_s / baseline_tokens_per_s if baseline_tokens_per_s else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# --- result rows --------------------------------------------------------------------------


class ConfigId(BaseModel):
    """What one series of rows measured: a profile's speculation, in-process or via HTTP."""

    #: The profile name, or ``no-spec`` for the baseline.
    config: str
    via: Via
    model: str
    speculative: SpeculativeSpec | None


class BenchRow(ConfigId):
    """One config at one concurrency level."""

    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    ttft_ms_p50: float | None
    ttft_ms_p95: float | None
    itl_ms_p50: float | None
    itl_ms_p95: float | None
    spec: SpecCounters
    #: Tokens/s over the no-spec row of the same model, ``via`` and concurrency.
    speedup: float | None = None
    #: 1-minute load average when the level ended: the machine's other work, for the caveat.
    load_avg: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @computed_field  # type: ignore[prop-decorator]
    @property
    def acceptance_rate(self) -> float | None:
        return self.spec.acceptance_rate

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mean_acceptance_length(self) -> float | None:
        return self.spec.mean_acceptance_length


def summarize(
    config: ConfigId,
    concurrency: int,
    records: Sequence[RequestRecord],
    wall_s: float,
    counters: Counters,
    load_avg: float,
) -> BenchRow:
    """Aggregate one level's request records and counter deltas into a row."""
    ttft = [r.ttft_s for r in records]
    itl = [x for r in records for x in r.itl_s]
    return BenchRow(
        **dict(config),
        concurrency=concurrency,
        requests=len(records),
        output_tokens=counters.generation_tokens,
        wall_s=wall_s,
        ttft_ms_p50=_ms(percentile(ttft, 50)),
        ttft_ms_p95=_ms(percentile(ttft, 95)),
        itl_ms_p50=_ms(percentile(itl, 50)),
        itl_ms_p95=_ms(percentile(itl, 95)),
        spec=counters.spec,
        load_avg=load_avg,
    )


def _baseline_key(row: BenchRow) -> tuple[str, Via, int]:
    return row.model, row.via, row.concurrency


def with_speedups(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """Rows with ``speedup`` set on speculative rows that have a baseline to compare with."""
    baseline = {_baseline_key(r): r.tokens_per_s for r in rows if r.speculative is None}
    return [
        r
        if r.speculative is None
        else r.model_copy(
            update={"speedup": speedup(r.tokens_per_s, baseline.get(_baseline_key(r)))}
        )
        for r in rows
    ]


class ServiceRatio(BaseModel):
    """Throughput of one config through ``bentoml serve`` relative to the bare engine."""

    config: str
    concurrency: int
    engine_tokens_per_s: float
    service_tokens_per_s: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ratio(self) -> float:
        return self.service_tokens_per_s / self.engine_tokens_per_s


def service_ratios(rows: Sequence[BenchRow]) -> list[ServiceRatio]:
    """One ratio per config and concurrency measured both in-process and via the service."""
    engine = {(r.config, r.concurrency): r for r in rows if r.via == "engine"}
    return [
        ServiceRatio(
            config=r.config,
            concurrency=r.concurrency,
            engine_tokens_per_s=engine[(r.config, r.concurrency)].tokens_per_s,
            service_tokens_per_s=r.tokens_per_s,
        )
        for r in rows
        if r.via == "service" and (r.config, r.concurrency) in engine
    ]


class TargetCheck(BaseModel):
    target: str
    config: str
    measured: float
    threshold: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def met(self) -> bool:
        return self.measured >= self.threshold


def target_checks(rows: Sequence[BenchRow], ratios: Sequence[ServiceRatio]) -> list[TargetCheck]:
    """The issue's targets against what was measured (only those the run has data for)."""
    top = max((r.concurrency for r in rows if r.speedup is not None), default=None)
    checks: list[TargetCheck] = []
    for row in rows:
        spec, gain = row.speculative, row.speedup
        if spec is None or gain is None:
            continue
        if row.concurrency == 1 and spec.method in MODEL_FREE_METHODS:
            checks.append(
                TargetCheck(
                    target="tokens/s vs no-spec at concurrency 1",
                    config=row.config,
                    measured=gain,
                    threshold=TARGET_SPEEDUP_AT_1,
                )
            )
        if row.concurrency == top:
            checks.append(
                TargetCheck(
                    target=f"tokens/s vs no-spec at concurrency {top}",
                    config=row.config,
                    measured=gain,
                    threshold=TARGET_SPEEDUP_AT_MAX,
                )
            )
    checks.extend(
        TargetCheck(
            target=f"service/engine tokens/s at concurrency {r.concurrency}",
            config=r.config,
            measured=r.ratio,
            threshold=TARGET_SERVICE_RATIO,
        )
        for r in ratios
    )
    return checks


class ConfigSummary(BaseModel):
    """One speculative config over all its levels: the figures a reader quotes."""

    config: str
    via: Via
    speculative: SpeculativeSpec
    #: Speedup by concurrency level.
    speedups: dict[int, float]
    #: Spec-decode counts summed over the levels.
    spec: SpecCounters

    @computed_field  # type: ignore[prop-decorator]
    @property
    def median_speedup(self) -> float:
        return statistics.median(self.speedups.values())


def summarize_configs(rows: Sequence[BenchRow]) -> list[ConfigSummary]:
    """One summary per speculative config (and ``via``) that has speedups."""
    groups: dict[tuple[str, Via], list[tuple[BenchRow, SpeculativeSpec, float]]] = {}
    for row in rows:
        if row.speculative is not None and row.speedup is not None:
            groups.setdefault((row.config, row.via), []).append((row, row.speculative, row.speedup))
    return [
        ConfigSummary(
            config=config,
            via=via,
            speculative=group[0][1],
            speedups={row.concurrency: gain for row, _, gain in group},
            spec=SpecCounters(
                drafts=sum(row.spec.drafts for row, _, _ in group),
                draft_tokens=sum(row.spec.draft_tokens for row, _, _ in group),
                accepted_tokens=sum(row.spec.accepted_tokens for row, _, _ in group),
            ),
        )
        for (config, via), group in groups.items()
    ]


# --- report -------------------------------------------------------------------------------


class BenchSettings(BaseModel):
    """What a run measures; :meth:`command` is the command line that reproduces it."""

    profiles: list[str] = ["cpu"]
    #: Prompt file in the dataset format; ``None`` is the committed dataset.
    prompts: str | None = None
    categories: list[str] = []
    num_prompts: int | None = None
    max_tokens: int = 128
    concurrency: list[int] = list(DEFAULT_CONCURRENCY)
    #: A running service to measure instead of (or, with ``compare_service``, besides) engines.
    url: str | None = None
    compare_service: bool = False
    out: str = str(DEFAULT_OUT)

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
        if self.url is not None:
            args += ["--url", self.url]
        if self.compare_service:
            args.append("--compare-service")
        args += ["--out", self.out]
        return shlex.join(args)


class BenchReport(BaseModel):
    settings: BenchSettings
    #: Number of prompt cases; each level sends max(prompts, 2 x concurrency) requests.
    prompts: int
    cpu_count: int | None
    started_at: datetime
    finished_at: datetime
    rows: list[BenchRow]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def summary(self) -> list[ConfigSummary]:
        return summarize_configs(self.rows)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def service(self) -> list[ServiceRatio]:
        return service_ratios(self.rows)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def targets(self) -> list[TargetCheck]:
        return target_checks(self.rows, self.service)


def describe(spec: SpeculativeSpec | None) -> str:
    """A speculative config in one cell: method, k, lookup window, batch-size schedule."""
    if spec is None:
        return "none"
    text = f"{spec.method} k={spec.num_speculative_tokens}"
    if spec.prompt_lookup_max is not None:
        text += f" n={spec.prompt_lookup_min or 1}..{spec.prompt_lookup_max}"
    if spec.num_speculative_tokens_per_batch_size:
        steps = ", ".join(f"{a}-{b}:{k}" for a, b, k in spec.num_speculative_tokens_per_batch_size)
        text += f" (batch {steps})"
    return text


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _pair(a: float | None, b: float | None) -> str:
    return f"{_num(a, '.0f')} / {_num(b, '.0f')}"


def markdown_table(
    headers: Sequence[str], cells: Iterable[Sequence[str]], text_columns: int = 1
) -> str:
    """A GitHub Markdown table: the first ``text_columns`` left-aligned, numbers right-aligned."""
    align = [":---"] * text_columns + ["---:"] * (len(headers) - text_columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def results_table(rows: Sequence[BenchRow]) -> str:
    return markdown_table(
        [
            "config",
            "via",
            "speculation",
            "concurrency",
            "tokens/s",
            "speedup",
            "TTFT p50 / p95 ms",
            "ITL p50 / p95 ms",
            "acceptance rate",
            "acceptance length",
            "load avg",
        ],
        (
            [
                r.config,
                r.via,
                describe(r.speculative),
                str(r.concurrency),
                _num(r.tokens_per_s),
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
                _pair(r.ttft_ms_p50, r.ttft_ms_p95),
                _pair(r.itl_ms_p50, r.itl_ms_p95),
                _num(r.acceptance_rate, ".2f"),
                _num(r.mean_acceptance_length, ".2f"),
                _num(r.load_avg),
            ]
            for r in rows
        ),
        text_columns=3,
    )


def summary_table(summaries: Sequence[ConfigSummary]) -> str:
    levels = sorted({c for summary in summaries for c in summary.speedups})
    return markdown_table(
        [
            "config",
            "via",
            "speculation",
            f"speedup at concurrency {', '.join(map(str, levels))}",
            "median speedup",
            "acceptance rate",
            "acceptance length",
        ],
        (
            [
                summary.config,
                summary.via,
                describe(summary.speculative),
                ", ".join(
                    "-" if c not in summary.speedups else f"{summary.speedups[c]:.2f}x"
                    for c in levels
                ),
                f"{summary.median_speedup:.2f}x",
                _num(summary.spec.acceptance_rate, ".2f"),
                _num(summary.spec.mean_acceptance_length, ".2f"),
            ]
            for summary in summaries
        ),
        text_columns=3,
    )


def render_markdown(report: BenchReport) -> str:
    """The report as Markdown: settings, summary, results, service overhead and targets."""
    settings = report.settings
    loads = [r.load_avg for r in report.rows]
    parts = [
        f"{report.prompts} prompts ({', '.join(settings.categories) or 'all categories'}) from "
        f"`{Path(settings.prompts).name if settings.prompts else 'prompts.jsonl'}`, "
        f"max_tokens {settings.max_tokens}, greedy; each level sends "
        f"max(prompts, 2 x concurrency) requests. {report.cpu_count} CPUs, 1-minute load average "
        f"{_num(min(loads, default=None))}-{_num(max(loads, default=None))} during the run, "
        f"{report.started_at:%Y-%m-%d %H:%M} UTC.",
        f"Reproduce: `{settings.command()}`",
    ]
    if report.summary:
        parts += ["Summary (speedup = tokens/s over no speculation at the same concurrency):"]
        parts.append(summary_table(report.summary))
    parts += ["All measurements:", results_table(report.rows)]
    if report.service:
        parts += [
            "Service overhead (`bentoml serve`, streaming `/generate`, vs the in-process engine):",
            markdown_table(
                ["config", "concurrency", "engine tokens/s", "service tokens/s", "ratio"],
                (
                    [
                        s.config,
                        str(s.concurrency),
                        _num(s.engine_tokens_per_s),
                        _num(s.service_tokens_per_s),
                        f"{s.ratio:.2f}",
                    ]
                    for s in report.service
                ),
            ),
            f"Median service/engine ratio: "
            f"{statistics.median(s.ratio for s in report.service):.2f}.",
        ]
    if report.targets:
        parts += [
            "Targets:",
            markdown_table(
                ["target", "config", "measured", "target", "met"],
                (
                    [t.target, t.config, f"{t.measured:.2f}", f">= {t.threshold:g}", _yes(t.met)]
                    for t in report.targets
                ),
                text_columns=2,
            ),
        ]
    return "\n\n".join(parts) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def plot(rows: Sequence[BenchRow], path: Path) -> None:
    """Tokens/s, speedup and median ITL against concurrency, one line per config."""
    from matplotlib.figure import Figure

    series: dict[tuple[str, Via], list[BenchRow]] = {}
    for row in rows:
        series.setdefault((row.config, row.via), []).append(row)
    levels = sorted({r.concurrency for r in rows})
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    throughput, gain, itl = figure.subplots(1, 3)
    for i, ((config, via), points) in enumerate(series.items()):
        style = {
            "label": config if via == "engine" else f"{config} (service)",
            "color": f"C{i}",
            "marker": "o",
            "linestyle": "-" if via == "engine" else "--",
        }
        x = [p.concurrency for p in points]
        throughput.plot(x, [p.tokens_per_s for p in points], **style)
        itl.plot(x, [p.itl_ms_p50 for p in points], **style)
        if any(p.speedup is not None for p in points):
            gain.plot(x, [p.speedup for p in points], **style)
    gain.axhline(1.0, color="grey", linewidth=0.8)
    gain.axhline(TARGET_SPEEDUP_AT_1, color="grey", linewidth=0.8, linestyle=":")
    for axes, title in (
        (throughput, "output tokens/s"),
        (gain, "speedup vs no speculation (same concurrency)"),
        (itl, "inter-token latency p50 (ms)"),
    ):
        axes.set_title(title)
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(c) for c in levels])
        axes.set_xlabel("concurrency")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    throughput.legend()
    figure.savefig(path, dpi=110)


def splice(document: str, block: str) -> str:
    """``document`` with the text between :data:`DOC_START` and :data:`DOC_END` replaced."""
    head, start, rest = document.partition(DOC_START)
    _, end, tail = rest.partition(DOC_END)
    if not start or not end:
        raise ValueError(f"the document has no {DOC_START} ... {DOC_END} block")
    return f"{head}{DOC_START}\n{block.strip()}\n{DOC_END}{tail}"


def write_report(report: BenchReport, out: Path) -> str:
    """Write results.json, results.md and results.png into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = render_markdown(report)
    (out / "results.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(text, encoding="utf-8")
    plot(report.rows, out / "results.png")
    return text


# --- running ------------------------------------------------------------------------------


class Client(Protocol):
    """One way to send requests to a config: in-process or over HTTP."""

    async def request(self, prompt: str, max_tokens: int) -> RequestRecord: ...

    async def counters(self) -> Counters: ...


@functools.cache
def tokenizer(model: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


def greedy(max_tokens: int) -> SamplingOptions:
    """The benchmark's sampling: greedy, no top_k (see the module docstring)."""
    return SamplingOptions(max_tokens=max_tokens, temperature=0)


class EngineClient:
    """Requests straight into an in-process engine: its speed without HTTP."""

    def __init__(self, engine: SpecEngine) -> None:
        self._engine = engine

    async def request(self, prompt: str, max_tokens: int) -> RequestRecord:
        start = time.perf_counter()
        chunks = [
            (time.perf_counter(), len(out.outputs[0].token_ids))
            async for out in stream_outputs(self._engine, prompt, greedy(max_tokens))
        ]
        return record_from_chunks(start, chunks)

    async def counters(self) -> Counters:
        from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

        return Counters.from_samples(
            (m.name, m.value) for m in get_metrics_snapshot() if isinstance(m, Counter)
        )


class ServiceClient:
    """Requests through the service's streaming ``/generate``; counters from ``/metrics``."""

    def __init__(self, http: httpx.AsyncClient, count_tokens: Callable[[str], int]) -> None:
        self._http = http
        self._count_tokens = count_tokens

    async def request(self, prompt: str, max_tokens: int) -> RequestRecord:
        body = GenerateRequest(prompt=prompt, **greedy(max_tokens).model_dump())
        start = time.perf_counter()
        async with self._http.stream(
            "POST", "/generate", json=body.model_dump(exclude_defaults=True)
        ) as response:
            if response.is_error:
                await response.aread()
                raise RuntimeError(f"/generate answered {response.status_code}: {response.text}")
            pieces = [(time.perf_counter(), text) async for text in response.aiter_text()]
        return record_from_chunks(start, token_chunks(pieces, self._count_tokens))

    async def counters(self) -> Counters:
        from prometheus_client.parser import text_string_to_metric_families

        response = await self._http.get("/metrics")
        response.raise_for_status()
        samples = [
            (sample.name, sample.value)
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        ]
        if not any(name.removesuffix("_total") == GENERATION_TOKENS for name, _ in samples):
            raise RuntimeError(
                f"{response.url} has no {GENERATION_TOKENS}: each `bentoml serve` empties "
                "<BENTOML_HOME>/prometheus_multiproc_dir when it starts, so run no other server "
                "with the same BENTOML_HOME during the benchmark"
            )
        return Counters.from_samples(samples)


@contextlib.asynccontextmanager
async def open_engine(profile: Profile) -> AsyncIterator[EngineClient]:
    engine = SpecEngine(profile)
    try:
        await engine.start()
        yield EngineClient(engine)
    finally:
        engine.shutdown()


@contextlib.asynccontextmanager
async def open_service(url: str, model: str) -> AsyncIterator[ServiceClient]:
    key = os.environ.get(API_KEY_ENV)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"} if key else None,
        timeout=httpx.Timeout(600, connect=10),
    ) as http:
        model_tokenizer = tokenizer(model)
        yield ServiceClient(
            http, lambda text: len(model_tokenizer.encode(text, add_special_tokens=False))
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(profile: str, log_path: Path, timeout: float = 600) -> AsyncIterator[str]:
    """``bentoml serve`` of catalogue profile ``profile`` on a free port; yields its URL once
    ``/readyz`` answers 200, and stops it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        *(sys.executable, "-m", "bentoml", "serve", "service:BentoSpec"),
        *("--host", "127.0.0.1", "--port", str(port), "--arg", f"profile={profile}"),
    ]
    # Every `bentoml serve` empties <BENTOML_HOME>/prometheus_multiproc_dir when it starts: a
    # home of its own keeps a server started meanwhile (tests) from wiping this one's counters.
    with (
        tempfile.TemporaryDirectory(prefix="bentospec-bench-") as home,
        log_path.open("wb") as log,
    ):
        proc = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, "BENTOML_HOME": home},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await _wait_ready(url, proc, log_path, timeout)
            yield url
        finally:
            await asyncio.to_thread(_stop, proc)


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(1)
    raise TimeoutError(f"bentoml serve not ready after {timeout:.0f}s; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def open_served(profile: Profile, log_path: Path) -> AsyncIterator[ServiceClient]:
    async with serve(profile.name, log_path) as url, open_service(url, profile.model.id) as client:
        yield client


class Run(NamedTuple):
    """One config and how to reach it; ``open`` starts what it needs and stops it after."""

    config: ConfigId
    open: Callable[[], AbstractAsyncContextManager[Client]]


def plan(profiles: Sequence[Profile]) -> list[Profile]:
    """No speculation once per target model, then each speculative profile, in order.

    A baseline keeps the engine settings of the first profile naming its model.
    """
    baselines: dict[str, Profile] = {}
    for profile in profiles:
        baselines.setdefault(profile.model.id, profile.without_speculation())
    many = len(baselines) > 1
    return [
        *(
            p.model_copy(update={"name": f"{NO_SPEC} {p.served_model_name}" if many else NO_SPEC})
            for p in baselines.values()
        ),
        *(p for p in profiles if p.speculative is not None),
    ]


def config_id(profile: Profile, via: Via) -> ConfigId:
    return ConfigId(
        config=profile.name, via=via, model=profile.model.id, speculative=profile.speculative
    )


def engine_runs(profiles: Sequence[Profile]) -> list[Run]:
    """In-process runs of :func:`plan`: the baseline(s), then each speculative profile."""
    return [Run(config_id(p, "engine"), functools.partial(open_engine, p)) for p in plan(profiles)]


def service_run(profile: Profile, url: str | None) -> Run:
    """``profile`` through HTTP: the service at ``url``, else one started for the run (its log
    goes to ``build/``, not to the results)."""
    opener = (
        functools.partial(open_service, url, profile.model.id)
        if url
        else functools.partial(open_served, profile, LOG_DIR / f"bench-server-{profile.name}.log")
    )
    return Run(config_id(profile, "service"), opener)


class Level(NamedTuple):
    records: list[RequestRecord]
    wall_s: float
    counters: Counters


async def run_level(
    client: Client,
    prompts: Sequence[str],
    requests: int,
    concurrency: int,
    max_tokens: int,
    progress: tqdm | None = None,
) -> Level:
    """``requests`` requests, cycling through ``prompts``, with ``concurrency`` in flight."""
    pending = iter(range(requests))
    records: list[RequestRecord] = []

    async def worker() -> None:
        # Workers share one iterator: each takes the next request as soon as it is free.
        for i in pending:
            records.append(await client.request(prompts[i % len(prompts)], max_tokens))
            if progress is not None:
                progress.update()

    before = await client.counters()
    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    wall_s = time.perf_counter() - start
    counters = await client.counters() - before
    if counters.generation_tokens <= 0:
        raise RuntimeError("the engine's generation counter did not grow: its metrics were reset")
    return Level(records, wall_s, counters)


def requests_per_level(prompts: int, concurrency: int) -> int:
    """Every prompt once, and at least two requests per slot: a level of one request per slot
    would be all ramp-up and tail, never a steady batch of ``concurrency``."""
    return max(prompts, 2 * concurrency)


async def measure(
    runs: Sequence[Run], cases: Sequence[PromptCase], concurrency: Sequence[int], max_tokens: int
) -> list[BenchRow]:
    """Each run at each concurrency level on the same prompts, one run at a time."""
    from tqdm import tqdm

    total = len(runs) * sum(requests_per_level(len(cases), c) for c in concurrency)
    rows: list[BenchRow] = []
    with tqdm(total=total, unit="req", dynamic_ncols=True) as progress:
        for run in runs:
            progress.set_description(f"{run.config.config} via {run.config.via}: starting")
            prompts = render_cases(list(cases), tokenizer(run.config.model))
            async with run.open() as client:
                top = max(concurrency)
                await run_level(client, prompts, min(len(prompts), top), top, WARMUP_MAX_TOKENS)
                for level in concurrency:
                    progress.set_description(f"{run.config.config} via {run.config.via} c={level}")
                    measured = await run_level(
                        client,
                        prompts,
                        requests_per_level(len(prompts), level),
                        level,
                        max_tokens,
                        progress,
                    )
                    rows.append(summarize(run.config, level, *measured, os.getloadavg()[0]))
    return with_speedups(rows)


async def run_bench(settings: BenchSettings, cases: Sequence[PromptCase]) -> BenchReport:
    """In-process runs (unless only ``url`` is measured), then the service run if asked for:
    the service starts only after the last engine has stopped."""
    profiles = [load_profile(name) for name in settings.profiles]
    runs: list[Run] = []
    if settings.url is None or settings.compare_service:
        runs += engine_runs(profiles)
    if settings.url is not None or settings.compare_service:
        runs.append(service_run(profiles[0], settings.url))
    started = datetime.now(UTC)
    rows = await measure(runs, cases, settings.concurrency, settings.max_tokens)
    return BenchReport(
        settings=settings,
        prompts=len(cases),
        cpu_count=os.cpu_count(),
        started_at=started,
        finished_at=datetime.now(UTC),
        rows=rows,
    )


# --- command line -------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_load_arguments(parser: argparse.ArgumentParser, concurrency: Sequence[int]) -> None:
    """The prompt and load options bench and tune share."""
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


def selected_cases(args: argparse.Namespace) -> list[PromptCase]:
    """The prompt cases ``--prompts/--categories/--num-prompts`` select; exits if none."""
    prompts = Path(args.prompts) if args.prompts else None
    cases = load_cases(prompts, set(args.categories) or None, args.num_prompts)
    if not cases:
        raise SystemExit("error: no prompts selected: check --prompts, --categories, --num-prompts")
    return cases


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="tokens/s, TTFT, ITL and acceptance with vs without speculation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        action="append",
        dest="profiles",
        metavar="NAME",
        help="profile to compare with no speculation; repeatable (default: cpu)",
    )
    parser.add_argument(
        "--prompts", metavar="FILE", help="JSONL prompt file (default: the committed dataset)"
    )
    add_load_arguments(parser, DEFAULT_CONCURRENCY)
    parser.add_argument(
        "--url",
        help="measure the running service at this URL (serving the first --profile) "
        "instead of in-process engines",
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
    if args.render is not None:
        report = BenchReport.model_validate_json(args.render.read_text(encoding="utf-8"))
        out = args.out or args.render.parent
    else:
        out = args.out or DEFAULT_OUT
        settings = BenchSettings(
            profiles=list(dict.fromkeys(args.profiles or ["cpu"])),
            prompts=args.prompts,
            categories=args.categories,
            num_prompts=args.num_prompts,
            max_tokens=args.max_tokens,
            concurrency=args.concurrency,
            url=args.url,
            compare_service=args.compare_service,
            out=str(out),
        )
        cases = selected_cases(args)
        report = asyncio.run(run_bench(settings, cases))
    text = write_report(report, out)
    if args.doc is not None:
        args.doc.write_text(splice(args.doc.read_text(encoding="utf-8"), text), encoding="utf-8")
    print(text)
    return 0
