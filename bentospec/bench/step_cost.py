"""``bentospec step-costs``: what one engine step costs, plain against speculative, taken apart.

Speculation pays when the tokens a step emits grow faster than what the step costs. On a CPU
that cost is mostly the target's GEMMs, and what a GEMM of ``k+1`` rows costs against one row
depends on the CPU class and the dtype (docs/benchmarks.md). This measures, on this host:

* **engine steps**: an in-process engine decoding ``batch`` copies of a prompt that ngram
  always drafts from (a repeated sentence, greedy, EOS ignored), with no speculation and with
  k drafts: milliseconds per decoding step, and the tokens each step verified;
* **the GEMMs alone**: every linear layer of the target (distinct weights per layer, so none
  stays in cache) run by the GEMM vLLM's CPU layers pick, at the same row counts, on 1 and 2
  threads: what of a step is matrix work and what is the rest (attention, sampling,
  scheduling, Python);
* **the memory bound**: the target's weight bytes over this core's read bandwidth, the least a
  plain step can cost.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bentospec import vllm_api
from bentospec.bench.render import markdown_table
from bentospec.cpu_host import CpuHost, detect_cpu_host
from bentospec.cpu_runtime import (
    bind_threads,
    engine_core_environment,
    every_cpu,
    preload_environment,
)
from bentospec.engine import SpecEngine
from bentospec.model_store import resolve_model
from bentospec.profile import Profile, SpeculativeSpec

#: ngram drafts from it at every step: the greedy continuation repeats the sentence.
REPEATING_PROMPT = "The red fox jumps over the lazy brown dog near the river bank. " * 24


class StepCost(BaseModel):
    """One batch size and draft length, measured on the engine."""

    batch: int
    #: Drafts the profile asked for per request and step (0: no speculation).
    k: int
    #: Tokens the step ran through the target across the batch (batch x (1 + drafts)).
    tokens_per_step: float
    step_ms: float


class GemmCost(BaseModel):
    """Every linear layer of the target once, at ``rows`` rows, on ``threads`` threads."""

    rows: int
    threads: int
    ms: float


class StepCostReport(BaseModel):
    cpu: CpuHost
    profile: str
    dtype: str
    #: The target's linear weights (what one plain step must read), in MB.
    weights_mb: float
    #: One thread's read bandwidth, GB/s, and the time to read the weights once at it.
    read_gb_s: float
    memory_bound_ms: float
    gemm: list[GemmCost]
    steps: list[StepCost]


def linear_shapes(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of a Llama-like target, the LM head last."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    layer = [
        (hidden + 2 * kv_heads * head_dim, hidden),  # fused q, k, v
        (hidden, heads * head_dim),  # o
        (2 * inter, hidden),  # fused gate, up
        (hidden, inter),  # down
    ]
    return layer * config["num_hidden_layers"] + [(config["vocab_size"], hidden)]


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm: oneDNN builds its primitive for this shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _on_every_core() -> None:
    bind_threads(os.getpid(), every_cpu())


def gemm_costs(
    shapes: Sequence[tuple[int, int]], dtype: str, rows: Sequence[int], threads: Sequence[int]
) -> list[GemmCost]:
    import torch

    torch_dtype = getattr(torch, dtype)
    linears = [vllm_api.cpu_linear(torch.randn(n, k, dtype=torch_dtype) * 0.02) for n, k in shapes]
    inputs = {m: {k: torch.randn(m, k, dtype=torch_dtype) for _, k in shapes} for m in rows}
    found = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for m in rows:
            x = inputs[m]
            ms = _median_ms(
                lambda x=x: [f(x[k]) for f, (_, k) in zip(linears, shapes, strict=True)], 5
            )
            found.append(GemmCost(rows=m, threads=n_threads, ms=ms))
    torch.set_num_threads(1)
    return found


def read_bandwidth_gb_s() -> float:
    """One thread summing 1 GiB: the rate a decoding step can stream weights at."""
    import torch

    torch.set_num_threads(1)
    data = torch.ones(2**28, dtype=torch.float32)
    ms = _median_ms(data.sum, 5)
    return data.numel() * 4 / (ms / 1000) / 1e9


async def _run_batch(
    engine: SpecEngine, batch: int, max_tokens: int, run: str
) -> tuple[float, int, float]:
    """Seconds, engine steps and draft tokens of ``batch`` requests started together, each
    with its own prompt (``run`` keeps prefix caching from serving an earlier run's prefill)."""
    params = vllm_api.sampling_params(
        stream=False, temperature=0.0, max_tokens=max_tokens, ignore_eos=True
    )

    async def one(i: int) -> None:
        async for _ in engine.generate(f"{run}-{i}: {REPEATING_PROMPT}", params):
            pass

    steps, drafts = vllm_api.engine_step_count(), _draft_tokens()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    elapsed = time.perf_counter() - start
    await asyncio.sleep(0.5)  # vLLM records a step's stats after its outputs went out
    return elapsed, vllm_api.engine_step_count() - steps, _draft_tokens() - drafts


def _draft_tokens() -> float:
    return sum(v for name, v in vllm_api.counter_samples() if name == vllm_api.DRAFT_TOKENS)


async def engine_step(engine: SpecEngine, batch: int, max_tokens: int) -> StepCost:
    """Decoding ms per step with ``batch`` requests in lockstep, and the tokens it verified:
    a run of ``max_tokens`` less a run of one token (the prefill), both counted in steps."""
    prefill_s, prefill_steps, _ = await _run_batch(engine, batch, 1, f"p{batch}")
    total_s, total_steps, drafted = await _run_batch(engine, batch, max_tokens, f"d{batch}")
    steps = max(total_steps - prefill_steps, 1)
    spec = engine.profile.speculative
    return StepCost(
        batch=batch,
        k=spec.num_speculative_tokens if spec else 0,
        tokens_per_step=batch + drafted / steps,
        step_ms=(total_s - prefill_s) / steps * 1000,
    )


async def engine_steps(
    profile: Profile, batches: Sequence[int], max_tokens: int
) -> tuple[str, list[StepCost]]:
    """The engine's resolved dtype, and a step's cost at each batch size."""
    async with SpecEngine(profile) as engine:
        await engine_step(engine, 1, 8)  # warm-up
        found = []
        for batch in batches:
            found.append(await engine_step(engine, batch, max_tokens))
            print(f"step cost: {found[-1].model_dump_json()}", file=sys.stderr, flush=True)
        return engine.dtype, found


def measure(
    profile: Profile, ks: Sequence[int], batches: Sequence[int], max_tokens: int
) -> StepCostReport:
    config = json.loads((Path(resolve_model(profile.model.id)) / "config.json").read_text())
    shapes = linear_shapes(config)
    steps: list[StepCost] = []
    dtype = "float32"
    for k in ks:
        variant = (
            profile.without_speculation()
            if k == 0
            else profile.with_speculative(
                SpeculativeSpec(
                    method="ngram",
                    num_speculative_tokens=k,
                    prompt_lookup_min=2,
                    prompt_lookup_max=5,
                )
            )
        )
        dtype, found = asyncio.run(engine_steps(variant, batches, max_tokens))
        steps += found
    rows = sorted({round(s.tokens_per_step) for s in steps})
    weights = sum(n * k for n, k in shapes) * (4 if dtype == "float32" else 2)
    # In a fresh process with the engine core's OpenMP and allocator: this one's torch has
    # had vLLM's frontend settings applied, and GNU OpenMP where the engine core has Intel's;
    # on every core, not the reserved ones this process was confined to with its engines.
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, spawn, initializer=_on_every_core)
    with engine_core_environment(preload_environment()), pool:
        gemm = pool.submit(gemm_costs, shapes, dtype, rows, (1, 2)).result()
        bandwidth = pool.submit(read_bandwidth_gb_s).result()
    return StepCostReport(
        cpu=detect_cpu_host(),
        profile=profile.name,
        dtype=dtype,
        weights_mb=weights / 1e6,
        read_gb_s=bandwidth,
        memory_bound_ms=weights / (bandwidth * 1e9) * 1000,
        gemm=gemm,
        steps=steps,
    )


def render(report: StepCostReport) -> str:
    gemm = {(g.rows, g.threads): g.ms for g in report.gemm}
    plain = {s.batch: s.step_ms for s in report.steps if s.k == 0}
    cells = []
    for s in report.steps:
        rows = round(s.tokens_per_step)
        cells.append(
            [
                str(s.batch),
                str(s.k),
                f"{s.tokens_per_step:.1f}",
                f"{s.step_ms:.1f}",
                f"{s.step_ms / plain[s.batch]:.2f}" if s.batch in plain else "-",
                f"{gemm[(rows, 1)]:.1f}",
                f"{s.step_ms - gemm[(rows, 1)]:.1f}",
                f"{gemm[(rows, 2)]:.1f}",
            ]
        )
    head = (
        f"{report.cpu.model} (class {report.cpu.host_class}), {report.dtype}, profile "
        f"{report.profile}: linear weights {report.weights_mb:.0f} MB, one thread reads "
        f"{report.read_gb_s:.1f} GB/s, so a plain step cannot take less than "
        f"{report.memory_bound_ms:.1f} ms."
    )
    table = markdown_table(
        [
            "batch",
            "k",
            "tokens per step",
            "step ms",
            "vs plain step",
            "GEMMs ms (1 thread)",
            "rest ms",
            "GEMMs ms (2 threads)",
        ],
        cells,
        text_columns=0,
    )
    return f"{head}\n\n{table}\n"
