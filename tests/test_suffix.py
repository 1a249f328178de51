"""The benchmark never rewards memory: a config that remembers every answer gains nothing."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from bentospec.bench.prompt_plan import PromptReuse
from bentospec.bench.records import BenchRow, BenchSettings
from bentospec.bench.runner import BenchConfig, engine_target, run_targets
from bentospec.dataset import HELDOUT_POOL, PromptCase, load_cases
from bentospec.profile import load_profile

#: The unseen run's prompts: one to warm up, then a level of 12 at concurrency 1.
POOL = load_cases(HELDOUT_POOL, {"rag"})[:13]


def drafted_share(row: BenchRow) -> float:
    """Share of a level's output tokens that were accepted drafts."""
    return row.spec.accepted_tokens / row.output_tokens


def measure(
    reuse: PromptReuse, rounds: int, per_slot: int, cases: list[PromptCase]
) -> list[BenchRow]:
    profile = load_profile("cpu-suffix")
    settings = BenchSettings(
        profiles=[profile.name],
        concurrency=[1],
        max_tokens=32,
        rounds=rounds,
        requests_per_slot=per_slot,
        prompt_reuse=reuse,
    )
    target = engine_target(BenchConfig.of(profile))
    return asyncio.run(run_targets(settings, [target], cases)).rows


@pytest.mark.engine
def test_a_remembering_config_gains_nothing_from_the_default_workload() -> None:
    """cpu-suffix's global tree keeps every answer. Unseen (the default), the second round's
    servers get the first round's prompts afresh and draft exactly as much; repeated, the
    same prompts a second time on one server come back mostly from memory."""
    spec = load_profile("cpu-suffix").speculative
    assert spec is not None and spec.suffix_decoding_max_cached_requests
    first, second = measure("unseen", rounds=2, per_slot=1, cases=POOL)
    assert first.spec.draft_tokens > 0
    assert drafted_share(second) == pytest.approx(drafted_share(first), abs=0.02)
    # The 12 prompts of the unseen level, each sent twice to one server.
    (repeated,) = measure("repeated", rounds=1, per_slot=24, cases=POOL[1:])
    assert set(Counter(r.prompt for r in repeated.requests).values()) == {2}
    assert drafted_share(repeated) > drafted_share(first) + 0.1
