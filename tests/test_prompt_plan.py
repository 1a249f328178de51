"""Which prompt each benchmark request carries: no server sees a prompt twice unless asked."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bentospec.bench import render
from bentospec.bench.prompt_plan import (
    UNSEEN_LEVEL_MIN,
    PromptPlan,
    PromptPoolTooSmall,
    plan_prompts,
    requests_per_level,
    unseen_level_size,
)
from bentospec.bench.records import BenchSettings
from bentospec.dataset import HELDOUT_POOL, TUNE_POOL, load_cases

levels = st.lists(st.integers(1, 32), min_size=1, max_size=4, unique=True)
workloads = st.lists(st.sampled_from(["greedy", "sampling"]), min_size=1, unique=True)


def lives(plan: PromptPlan, rounds: int, outlive: bool) -> list[list[int]]:
    """What each server is sent, warm-up first: one server per round, or one for the run."""
    spans = [range(1, rounds + 1)] if outlive else [range(r, r + 1) for r in range(1, rounds + 1)]
    return [
        plan.warm_up + [i for (r, _, _), sent in plan.levels.items() if r in span for i in sent]
        for span in spans
    ]


@given(levels, workloads, st.integers(1, 4), st.integers(1, 6), st.booleans())
def test_unseen_never_sends_a_server_a_prompt_twice(
    concurrency: list[int], names: list[str], rounds: int, per_slot: int, outlive: bool
) -> None:
    plan = plan_prompts(10_000, concurrency, names, rounds, per_slot, "unseen", outlive)
    for sent in lives(plan, rounds, outlive):
        assert max(Counter(sent).values()) == 1
    for (_, _, level), sent in plan.levels.items():
        assert len(sent) == unseen_level_size(level, per_slot) >= UNSEEN_LEVEL_MIN
    assert len(plan.warm_up) == max(concurrency)
    if not outlive:  # fresh servers each round: the same prompts, paired across rounds too
        assert all(sent == plan.level(1, w, c) for (_, w, c), sent in plan.levels.items())


@given(levels, workloads, st.integers(1, 4), st.integers(1, 6), st.booleans())
def test_unseen_needs_exactly_the_prompts_it_uses(
    concurrency: list[int], names: list[str], rounds: int, per_slot: int, outlive: bool
) -> None:
    args = (concurrency, names, rounds, per_slot, "unseen", outlive)
    plan = plan_prompts(10_000, *args)
    needed = len({i for sent in lives(plan, rounds, outlive) for i in sent})
    assert plan_prompts(needed, *args) == plan
    with pytest.raises(PromptPoolTooSmall, match=f"needs {needed} distinct prompts"):
        plan_prompts(needed - 1, *args)


@given(st.integers(1, 60), levels, st.integers(1, 3), st.integers(1, 6))
def test_repeated_cycles_every_prompt_in_every_level(
    prompts: int, concurrency: list[int], rounds: int, per_slot: int
) -> None:
    plan = plan_prompts(prompts, concurrency, ["greedy"], rounds, per_slot, "repeated", True)
    assert plan.warm_up == list(range(min(prompts, max(concurrency))))
    for (_, _, level), sent in plan.levels.items():
        assert len(sent) == requests_per_level(prompts, level, per_slot)
        assert set(sent) == set(range(prompts))


def test_a_refusal_names_the_fixes() -> None:
    with pytest.raises(PromptPoolTooSmall) as refused:
        plan_prompts(24, [1, 4, 16], ["greedy"], 3, 4, "unseen", outlive_rounds=True)
    message = str(refused.value)
    assert "needs 292 distinct prompts, the selection has 24" in message
    assert "--restart-servers" in message and "--prompt-reuse repeated" in message


@pytest.mark.parametrize(
    ("settings", "outlive"),
    [
        (BenchSettings(), False),  # in-process engines, one per round
        (BenchSettings(servers=True), True),
        (BenchSettings(servers=True, restart_servers=True), False),
        (BenchSettings(url="http://localhost:3000"), True),
    ],
)
def test_servers_outlive_rounds_unless_started_each_round(
    settings: BenchSettings, outlive: bool
) -> None:
    assert settings.servers_outlive_rounds is outlive
    lives = "the whole run" if outlive else "one round"
    assert f"at most once in its life ({lives})" in render._reuse(settings)


@pytest.mark.parametrize("pool", [TUNE_POOL, HELDOUT_POOL])
@pytest.mark.parametrize("category", ["rag", "chat"])
def test_each_pool_holds_a_headline_round_per_category(pool: object, category: str) -> None:
    """bench's defaults (c1/c4/c16, 4 per slot, fresh servers per round) fit one category."""
    cases = load_cases(pool, {category})  # type: ignore[arg-type]
    plan_prompts(len(cases), [1, 4, 16], ["greedy"], 3, 4, "unseen", outlive_rounds=False)
    assert len({(c.query, c.documents) for c in cases}) == len(cases)


def test_the_pools_share_no_prompt_or_document() -> None:
    tune, heldout = load_cases(TUNE_POOL), load_cases(HELDOUT_POOL)
    assert not {c.query for c in tune if c.category == "chat"} & {
        c.query for c in heldout if c.category == "chat"
    }
    assert not {d for c in tune for d in c.documents} & {d for c in heldout for d in c.documents}


@pytest.mark.parametrize("pool", [TUNE_POOL, HELDOUT_POOL])
def test_any_stretch_of_a_mixed_selection_is_mixed(pool: object) -> None:
    """A level takes consecutive prompts: RAG and chat alternate while both last."""
    categories = [c.category for c in load_cases(pool)]  # type: ignore[arg-type]
    chats = categories.count("chat")
    assert categories[: 2 * chats] == ["rag", "chat"] * chats
