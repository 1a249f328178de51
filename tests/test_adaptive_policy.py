"""The adaptive proposer's decision logic, without vLLM: acceptance, step cost, k, probes."""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import accumulate

import pytest

from bentospec.adaptive_policy import (
    PROBE_INTERVAL,
    PROBE_TOKENS,
    AdaptivePolicy,
    Row,
    StepCost,
    choose_ks,
    step_time,
)

#: A cost curve where verifying a token costs a fifth of a step's fixed part.
COST = ((1, 10.0), (2, 12.0), (100, 208.0))


def curve(cost: tuple[tuple[int, float], ...]) -> Callable[[float], float]:
    return lambda tokens: step_time(cost, tokens)


class Clock:
    """The seconds a policy is called at: one step of ``ms`` per call."""

    def __init__(self) -> None:
        self.now = 0.0

    def tick(self, ms: float) -> float:
        self.now += ms / 1000.0
        return self.now


def policy_at(cost: tuple[tuple[int, float], ...]) -> tuple[AdaptivePolicy, Clock]:
    return AdaptivePolicy(cost=StepCost(prior=cost), k=5), Clock()


def geometric(rate: float, n: int = 5) -> list[float]:
    """One acceptance rate for every position: the j-th draft token adds a^j (the bound)."""
    return [rate**j for j in range(1, n + 1)]


def test_step_time_interpolates_and_extends_the_measured_points() -> None:
    cost = ((1, 10.0), (11, 20.0), (21, 40.0))
    assert step_time(cost, 1) == 10.0
    assert step_time(cost, 6) == 15.0
    assert step_time(cost, 16) == 30.0
    assert step_time(cost, 31) == 60.0  # beyond the last point: the last slope
    assert step_time(cost, 0) == 9.0  # below the first: the first slope


def test_high_acceptance_drafts_everything_low_acceptance_nothing() -> None:
    assert choose_ks([geometric(0.9)], curve(COST)) == [5]
    assert choose_ks([geometric(0.05)], curve(COST)) == [0]
    # Each row's k stops where its next token's a^j no longer pays for itself.
    ks = choose_ks([geometric(0.9), geometric(0.7), geometric(0.1)], curve(COST))
    assert ks[0] == 5 and 0 < ks[1] < 5 and ks[2] == 0


def test_a_costlier_batch_drafts_less() -> None:
    cheap = ((1, 10.0), (100, 50.0))
    dear = ((1, 10.0), (100, 500.0))
    rows = [geometric(0.6)] * 8
    assert sum(choose_ks(rows, curve(cheap))) > sum(choose_ks(rows, curve(dear)))


def test_k_never_exceeds_the_available_draft_nor_the_profiles_k() -> None:
    assert choose_ks([geometric(0.99, 2), []], curve(COST)) == [2, 0]
    policy, clock = policy_at(COST)
    for _ in range(5):  # every draft accepted; the lookup offers 9 tokens, the profile's k is 5
        ks, _ = _feed(policy, clock, [Row("r", 6, 5, 9)])
    assert ks == [5]


def test_acceptance_is_kept_per_draft_position() -> None:
    """A request that copies whole drafts or misses the first token, in turn: the first
    position is a coin flip, the later ones near certain, and it drafts the full k where one
    rate for all positions (same tokens accepted per verification) stops short."""
    policy, clock = policy_at(COST)
    for step in range(20):
        _feed(policy, clock, [Row("r", 6 if step % 2 else 1, 5, 5)])
    rates = policy.rates("r")
    assert 0.35 < rates[0] < 0.65 and min(rates[1:]) > 0.8
    # One rate with the same accepted tokens per rejection: 2.5 accepted per 0.5 rejections.
    single = geometric(2.5 / 3.0)
    per_position = list(accumulate(rates, operator.mul))
    dear = curve(((1, 10.0), (100, 300.0)))
    assert choose_ks([per_position], dear) == [5]
    assert choose_ks([single], dear) < [5]


def test_a_new_request_starts_from_the_pooled_rates() -> None:
    copying, clock = policy_at(COST)
    for _ in range(10):
        _feed(copying, clock, [Row("rag", 6, 5, 5)])
    _feed(copying, clock, [Row("rag", 6, 5, 5), Row("new", 1, 0, 5)])
    chatting, clock = policy_at(COST)
    for _ in range(10):
        _feed(chatting, clock, [Row("chat", 1, 5, 5)])
    _feed(chatting, clock, [Row("chat", 1, 5, 5), Row("new", 1, 0, 5)])
    assert copying.rates("new")[0] > 0.6 > 0.4 > chatting.rates("new")[0]


def _feed(policy: AdaptivePolicy, clock: Clock, rows: list[Row]) -> tuple[list[int], list[str]]:
    """One step that took what the prior curve says for the tokens it verified."""
    verified = sum(1 + row.verified_drafts for row in rows)
    ks, decisions = policy.step(rows, clock.tick(step_time(policy.cost.prior, verified)))
    return ks, list(decisions)


def test_interleaved_requests_never_share_an_estimate() -> None:
    """Two requests swap rows between steps (the batch is condensed): each keeps its own."""
    policy, clock = policy_at(COST)
    good, bad = "req-good", "req-bad"
    _feed(policy, clock, [Row(good, 1, 0, 5), Row(bad, 1, 0, 5)])
    for step in range(12):
        # Row order alternates; the good request accepts all 5 drafts, the bad one none.
        rows = [Row(good, 6, 5, 5), Row(bad, 1, 5, 5)]
        _feed(policy, clock, rows if step % 2 else rows[::-1])
        # A third request comes and goes in between, taking row 0 sometimes.
        if step == 5:
            _feed(policy, clock, [Row("req-new", 1, 0, 5), Row(bad, 1, 0, 5), Row(good, 1, 0, 5)])
    assert min(policy.rates(good)) > 0.8
    assert policy.rates(bad)[0] < 0.2
    assert "req-new" not in policy.states  # finished requests are forgotten
    ks, _ = _feed(policy, clock, [Row(bad, 1, 0, 5), Row(good, 1, 0, 5)])
    assert ks == [0, 5]


def test_paused_request_is_probed_again_with_one_token() -> None:
    policy, clock = policy_at(COST)
    decision = "draft"
    for _ in range(10):  # every draft rejected, until the request is paused
        decision = _feed(policy, clock, [Row("r", 1, 5, 5)])[1][0]
        if decision == "paused":
            break
    assert decision == "paused"
    steps = [_feed(policy, clock, [Row("r", 1, 0, 5)]) for _ in range(PROBE_INTERVAL - 1)]
    assert [d[0] for _, d in steps[:-1]] == ["paused"] * (PROBE_INTERVAL - 2)
    assert steps[-1] == ([PROBE_TOKENS], ["probe"])
    # A rejected probe waits the full interval again.
    assert _feed(policy, clock, [Row("r", 1, 1, 5)]) == ([0], ["paused"])


def test_accepted_probes_follow_each_other_until_the_request_drafts() -> None:
    policy, clock = policy_at(((1, 10.0), (100, 500.0)))  # one accepted token does not pay
    for _ in range(8):  # every draft rejected: the estimate is low
        _feed(policy, clock, [Row("r", 1, 5, 5)])
    while _feed(policy, clock, [Row("r", 1, 0, 5)])[1] != ["probe"]:
        pass
    # The request copies again: each accepted probe brings the next at once, then drafts.
    decisions = [_feed(policy, clock, [Row("r", 2, 1, 5)])[1][0] for _ in range(5)]
    assert decisions[0] == "probe" and "draft" in decisions
    assert policy.rates("r")[0] > 0.5


def test_request_switched_off_never_drafts() -> None:
    policy, clock = policy_at(COST)
    for _ in range(PROBE_INTERVAL + 2):
        ks, decisions = _feed(policy, clock, [Row("r", 6, 0, 5, off=True)])
        assert ks == [0] and decisions == ["off"]


def test_rows_without_a_match_or_still_prefilling_are_not_counted_as_paused() -> None:
    policy, clock = policy_at(COST)
    ks, decisions = _feed(policy, clock, [Row("prefill", 0, 0, 0), Row("nomatch", 1, 0, 0)])
    assert ks == [0, 0] and decisions == ["none", "none"]


def test_a_new_request_is_measured_before_it_is_paused() -> None:
    """At a cost where the prior (a=0.5) does not pay, new requests still verify one draft."""
    dear = ((1, 10.0), (100, 500.0))
    assert choose_ks([geometric(0.5)] * 6, curve(dear)) == [0] * 6
    policy, clock = policy_at(dear)
    ks, decisions = _feed(policy, clock, [Row(f"r{i}", 1, 0, 5) for i in range(6)])
    assert ks == [PROBE_TOKENS] * 6 and decisions == ["probe"] * 6
    ks, decisions = _feed(policy, clock, [Row(f"r{i}", 1, 1, 5) for i in range(6)])
    assert ks == [0] * 6 and decisions == ["paused"] * 6


#: The prior curve of the step-cost tests: a step's fixed part is 100 ms, a token 10 ms.
PRIOR = ((1, 100.0), (101, 1100.0))


def _engine_ms(rows: int, drafts: int) -> float:
    """A host twice as slow as the prior on plain steps, where drafts cost a quarter of it."""
    return 2.0 * (step_time(PRIOR, rows) + 0.25 * 10.0 * drafts)


def test_step_cost_learns_the_hosts_speed_and_draft_cost_from_step_times() -> None:
    cost = StepCost(prior=PRIOR)
    assert (cost.speed, cost.draft_ratio) == (1.0, 1.0)
    for step in range(200):
        rows, drafts = 4 + step % 8, (step % 3) * 5
        cost.observe(rows, rows + drafts, _engine_ms(rows, drafts))
    assert cost.speed == pytest.approx(2.0, rel=0.02)
    assert cost.draft_ratio == pytest.approx(0.25, rel=0.05)
    # At this measured price, drafts that did not pay on the prior curve now do.
    rows = [geometric(0.3)] * 8
    assert sum(choose_ks(rows, curve(PRIOR))) == 0
    assert sum(choose_ks(rows, lambda n: cost.time(8, n))) > 0


def test_one_stalled_step_does_not_swing_the_estimate() -> None:
    cost = StepCost(prior=PRIOR)
    for _ in range(50):
        cost.observe(4, 4, step_time(PRIOR, 4))
    cost.observe(4, 4, 1000 * step_time(PRIOR, 4))
    assert cost.speed < 1.2


def test_only_steps_in_which_every_row_was_decoding_are_timed() -> None:
    policy, clock = policy_at(PRIOR)
    _feed(policy, clock, [Row("a", 0, 0, 0), Row("b", 0, 0, 0)])  # both prefill
    policy.step([Row("a", 1, 0, 5), Row("b", 0, 0, 0)], clock.tick(500))  # b still prefills
    policy.step([Row("a", 1, 0, 5), Row("b", 1, 0, 5)], clock.tick(500))  # b's last chunk
    assert policy.cost.speed_sums == StepCost(prior=PRIOR).speed_sums
    # A request arrives (its prefill is in the step) and after an idle minute another one.
    policy.step([Row("a", 1, 0, 5), Row("b", 1, 0, 5), Row("c", 1, 0, 5)], clock.tick(500))
    policy.step([Row("d", 1, 0, 5)], clock.tick(60_000))
    assert policy.cost.speed_sums == StepCost(prior=PRIOR).speed_sums
    # Two steady steps of d alone, at the prior's speed, twice: counted.
    policy.step([Row("d", 1, 0, 5)], clock.tick(step_time(PRIOR, 1)))
    policy.step([Row("d", 1, 0, 5)], clock.tick(step_time(PRIOR, 1)))
    assert policy.cost.speed_sums != StepCost(prior=PRIOR).speed_sums
    assert policy.cost.speed == pytest.approx(1.0)
