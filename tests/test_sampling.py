"""Lossless under sampling: speculation must leave the target's token distribution unchanged.

Rejection sampling accepts a draft token with probability min(1, p/q) and otherwise resamples
from the residual, so the tokens it emits follow the target's distribution exactly. Here that is
checked on real engines: 400 completions at temperature 1.0 with and without ngram speculation,
and a chi-square homogeneity test of the tokens at positions 2-6, where drafts were verified.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bentospec.engine import SpecEngine
from bentospec.schemas import SamplingOptions
from bentospec.verify import (
    SAMPLING_ALPHA,
    SAMPLING_PROMPT,
    homogeneity,
    positions_of,
    sample_tokens,
)
from tests.conftest import LoopThread

pytestmark = pytest.mark.engine

SAMPLES = 400
POSITIONS = range(2, 7)


@pytest.fixture(scope="module")
def drafting_engine(loop: LoopThread, cpu_engine: SpecEngine) -> Iterator[SpecEngine]:
    """The ``cpu`` profile drafting at every batch size (``bentospec verify``'s profile): the
    400 samples run at once, where the profile's schedule may not draft."""
    engine = SpecEngine(cpu_engine.profile.drafting_at_every_batch_size())
    loop.run(engine.start())
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def nospec_engine(loop: LoopThread, cpu_engine: SpecEngine) -> Iterator[SpecEngine]:
    """The ``cpu`` profile without speculation, in float32 like ``cpu_engine``."""
    engine = SpecEngine(cpu_engine.profile.without_speculation())
    loop.run(engine.start())
    yield engine
    engine.shutdown()


def test_homogeneity_accepts_one_distribution_and_rejects_another() -> None:
    same = homogeneity(2, [1] * 200 + [2] * 200, [1] * 190 + [2] * 210)
    shifted = homogeneity(2, [1] * 200 + [2] * 200, [1] * 100 + [2] * 300)
    assert same.p_value > 0.1 and same.tvd == pytest.approx(0.025)
    assert shifted.p_value < 1e-6 and shifted.tvd == pytest.approx(0.25)


def test_sampled_tokens_follow_the_same_distribution_with_speculation(
    loop: LoopThread, drafting_engine: SpecEngine, nospec_engine: SpecEngine
) -> None:
    options = SamplingOptions(temperature=1.0, max_tokens=POSITIONS.stop - 1)
    baseline, _ = loop.run(sample_tokens(nospec_engine, SAMPLING_PROMPT, SAMPLES, options))
    spec, used = loop.run(sample_tokens(drafting_engine, SAMPLING_PROMPT, SAMPLES, options))
    # Drafts were verified (and some accepted), so the rejection sampler decided these tokens.
    assert used.draft_tokens > SAMPLES and used.accepted_tokens > 0
    checks = [homogeneity(p, positions_of(baseline, p), positions_of(spec, p)) for p in POSITIONS]
    # Sampling is not degenerate: some position has several well-populated tokens.
    assert max(c.categories for c in checks) >= 3
    bound = SAMPLING_ALPHA / len(checks)  # Bonferroni: 0.1% false alarms for the whole test
    assert all(c.p_value >= bound for c in checks), checks
