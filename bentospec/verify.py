"""Lossless checks: speculation must not change what a model says.

Greedy (:func:`verify`): output with speculation equals output without it, token for token.
Sampling (:func:`verify_sampling`): the tokens sampled at each position follow the same
distribution with and without speculation (rejection sampling keeps the target's).

Both run in float32: in bf16, batched verification rounds differently from one-token decoding
and flips near-tied greedy choices, which is a numerical effect, not a speculation bug
(measured: 3 of 4 prompts differ in bf16, none in float32).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

from pydantic import BaseModel

from bentospec.engine import SpecEngine
from bentospec.generation import sampling_params, speculation_stats
from bentospec.metrics import SpecCounters
from bentospec.profile import Profile
from bentospec.schemas import SamplingOptions

if TYPE_CHECKING:
    from bentospec.vllm_api import RequestOutput

logger = logging.getLogger(__name__)


class Divergence(BaseModel):
    """Where one prompt's speculative output first differs from the baseline."""

    index: int
    position: int
    baseline: list[int]
    speculative: list[int]


class VerifyReport(BaseModel):
    profile: str
    method: str | None
    dtype: str
    prompts: int
    max_tokens: int
    tokens_compared: int
    divergences: list[Divergence]

    @property
    def ok(self) -> bool:
        return not self.divergences


async def greedy_tokens(engine: SpecEngine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy token ids for each prompt from a started engine, all prompts in flight at once."""
    params = sampling_params(SamplingOptions(temperature=0.0, max_tokens=max_tokens), stream=False)

    async def one(i: int, prompt: str) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompt, params, request_id=f"verify-{i}-{id(prompt)}"):
            tokens = list(out.outputs[0].token_ids)
        return tokens

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def run_profile(profile: Profile, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """:func:`greedy_tokens` from a fresh engine of ``profile``, shut down afterwards."""
    engine = SpecEngine(profile)
    await engine.start()
    try:
        return await greedy_tokens(engine, prompts, max_tokens)
    finally:
        engine.shutdown()


def first_divergence(index: int, baseline: list[int], speculative: list[int]) -> Divergence | None:
    if baseline == speculative:
        return None
    position = next(
        (i for i, (a, b) in enumerate(zip(baseline, speculative, strict=False)) if a != b),
        min(len(baseline), len(speculative)),
    )
    window = slice(position, position + 8)
    return Divergence(
        index=index,
        position=position,
        baseline=baseline[window],
        speculative=speculative[window],
    )


def compare(baseline: list[list[int]], speculative: list[list[int]]) -> list[Divergence]:
    return [
        d
        for i, (a, b) in enumerate(zip(baseline, speculative, strict=True))
        if (d := first_divergence(i, a, b)) is not None
    ]


async def verify(
    profile: Profile, prompts: list[str], *, max_tokens: int = 64, dtype: str = "float32"
) -> VerifyReport:
    """Compare ``profile`` with and without speculation on ``prompts``, in ``dtype``."""
    if profile.speculative is None:
        raise ValueError(f"profile {profile.name!r} has no speculation to verify")
    speculative = profile.drafting_at_every_batch_size().with_engine(dtype=dtype)
    logger.info("verify %s: baseline run (no speculation, %s)", profile.name, dtype)
    baseline = await run_profile(speculative.without_speculation(), prompts, max_tokens)
    logger.info("verify %s: speculative run (%s)", profile.name, profile.speculative.method)
    spec_tokens = await run_profile(speculative, prompts, max_tokens)
    return VerifyReport(
        profile=profile.name,
        method=profile.speculative.method,
        dtype=dtype,
        prompts=len(prompts),
        max_tokens=max_tokens,
        tokens_compared=sum(len(t) for t in baseline),
        divergences=compare(baseline, spec_tokens),
    )


#: Family-wise false-alarm rate of :func:`verify_sampling` over all positions checked.
SAMPLING_ALPHA = 1e-3
#: Tokens seen fewer times than this (both runs together) share one category, so that every
#: category of the chi-square test has enough expected count for its p-value to hold.
MIN_CATEGORY_COUNT = 10
#: Stands for "the sequence had already ended" at a position.
ENDED = -1
#: Default prompt of the sampling check: its continuation both copies from the prompt (so ngram
#: drafts are proposed and verified) and varies between samples (so the test has power).
SAMPLING_PROMPT = (
    "Pick a fruit: apple, pear or plum. Pick a colour: red, green or blue. "
    "Pick a fruit: apple, pear or plum. Pick a colour: red, green or blue. Pick a"
)


class PositionCheck(BaseModel):
    """Chi-square homogeneity test of the tokens sampled at one position, in both runs."""

    #: 1-based position in the completion.
    position: int
    categories: int
    chi2: float
    p_value: float
    #: Total-variation distance between the two empirical distributions.
    tvd: float


class SamplingReport(BaseModel):
    profile: str
    method: str | None
    dtype: str
    temperature: float
    samples: int
    alpha: float
    positions: list[PositionCheck]
    #: Draft tokens the speculative run verified over all samples, and how many it accepted.
    draft_tokens: int
    accepted_tokens: int

    @property
    def ok(self) -> bool:
        """No position rejects "same distribution" at ``alpha`` (Bonferroni over positions)."""
        return all(p.p_value >= self.alpha / len(self.positions) for p in self.positions)


def homogeneity(position: int, a: list[int], b: list[int]) -> PositionCheck:
    """Chi-square test that samples ``a`` and ``b`` come from one distribution (and their TVD)."""
    import torch

    count_a, count_b = Counter(a), Counter(b)
    support = sorted(set(count_a) | set(count_b))
    tvd = 0.5 * sum(abs(count_a[t] / len(a) - count_b[t] / len(b)) for t in support)
    rare = [t for t in support if count_a[t] + count_b[t] < MIN_CATEGORY_COUNT]
    table = [(count_a[t], count_b[t]) for t in support if t not in rare]
    table.append((sum(count_a[t] for t in rare), sum(count_b[t] for t in rare)))
    table = [row for row in table if sum(row) > 0]
    total = len(a) + len(b)
    chi2 = sum(
        (observed - expected) ** 2 / expected
        for row in table
        for observed, size in zip(row, (len(a), len(b)), strict=True)
        if (expected := sum(row) * size / total) > 0
    )
    dof = len(table) - 1
    p_value = (
        float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
        if dof > 0
        else 1.0
    )
    return PositionCheck(
        position=position, categories=len(table), chi2=chi2, p_value=p_value, tvd=tvd
    )


def positions_of(samples: list[list[int]], position: int) -> list[int]:
    """Each sample's token at 1-based ``position`` (:data:`ENDED` where it was shorter)."""
    return [t[position - 1] if len(t) >= position else ENDED for t in samples]


async def sample_tokens(
    engine: SpecEngine, prompt: str, samples: int, options: SamplingOptions
) -> tuple[list[list[int]], SpecCounters]:
    """``samples`` independent completions of ``prompt``, and the speculation they used."""
    params = sampling_params(options, stream=False)

    async def one(i: int) -> RequestOutput:
        final = None
        async for out in engine.generate(prompt, params, request_id=f"sample-{i}-{id(params)}"):
            final = out
        assert final is not None
        return final

    outputs = await asyncio.gather(*(one(i) for i in range(samples)))
    stats = [speculation_stats(engine.profile, out) for out in outputs]
    used = SpecCounters(
        draft_tokens=sum(s.draft_tokens for s in stats),
        accepted_tokens=sum(s.accepted_tokens for s in stats),
    )
    return [list(out.outputs[0].token_ids) for out in outputs], used


async def verify_sampling(
    profile: Profile,
    prompt: str,
    *,
    samples: int = 400,
    positions: range = range(2, 7),
    temperature: float = 1.0,
    dtype: str = "float32",
) -> SamplingReport:
    """Compare token distributions at ``positions`` with and without speculation.

    Rejection sampling must leave the target's distribution unchanged; each position's tokens
    from ``samples`` completions per run go through a chi-square homogeneity test.
    """
    if profile.speculative is None:
        raise ValueError(f"profile {profile.name!r} has no speculation to verify")
    speculative = profile.drafting_at_every_batch_size().with_engine(dtype=dtype)
    options = SamplingOptions(temperature=temperature, max_tokens=positions.stop - 1)
    runs: list[list[list[int]]] = []
    used = SpecCounters()
    for run_profile_ in (speculative.without_speculation(), speculative):
        logger.info("verify --sampling %s: %d samples (%s)", profile.name, samples, dtype)
        engine = SpecEngine(run_profile_)
        await engine.start()
        try:
            tokens, used = await sample_tokens(engine, prompt, samples, options)
        finally:
            engine.shutdown()
        runs.append(tokens)
    baseline, spec = runs
    return SamplingReport(
        profile=profile.name,
        method=profile.speculative.method,
        dtype=dtype,
        temperature=temperature,
        samples=samples,
        alpha=SAMPLING_ALPHA,
        positions=[
            homogeneity(p, positions_of(baseline, p), positions_of(spec, p)) for p in positions
        ],
        draft_tokens=used.draft_tokens,
        accepted_tokens=used.accepted_tokens,
    )
