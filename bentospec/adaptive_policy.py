"""The adaptive proposer's decisions, free of vLLM: k per request and step, from what pays.

* Each request keeps, per draft position j, how often a verification that reached j (every
  draft before it accepted) accepted it, decayed, with the batch's pooled rates as its prior.
  The j-th draft token then adds ``q_1 * ... * q_j`` expected tokens. With one rate ``a`` for
  every position this is the speedup bound ``(1 - a^(k+1)) / (1 - a)`` tokens per step; ngram
  drafts are copies, though, and once a copy's first tokens are accepted the rest usually are
  too (0.65, 0.75, 0.83, 0.91, 0.91 by position on the mixed RAG/chat prompts), so one rate
  for all positions undervalues long drafts.
* A step verifying n tokens across a batch of B rows costs ``T(B, n)``: the profile's measured
  ``step_cost`` curve is the prior, and :class:`StepCost` corrects it from the time between
  the policy's own calls. Draft tokens of all requests are taken best-first while they raise
  the batch's expected tokens per unit of time.
* A request whose drafts stop paying gets k=0 and is probed with one draft token every
  :data:`PROBE_INTERVAL` of its steps; an accepted probe is followed by another at once, so a
  request that starts copying again drafts again within a few steps.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal

#: Steps without drafts after which a paused request drafts once more to re-measure acceptance.
PROBE_INTERVAL = 16
#: Draft tokens a probe verifies: one token measures acceptance at a fraction of a full draft's
#: cost, which matters at large batches where most paused requests never copy.
PROBE_TOKENS = 1
#: Weight of a request's past verifications per new one: it follows about the last 5.
DECAY = 0.8
#: The same for the pooled rates of all requests: they follow about the last 50 verifications.
POOLED_DECAY = 0.98
#: Weight, in verifications, of the pooled rates in a request's own; the pool's own prior is
#: 0.5 at twice this weight.
PRIOR_WEIGHT = 1.0
#: Weight of past steps per new one in :class:`StepCost`: it follows about the last 20 steps.
COST_DECAY = 0.95

#: Per row and step: drafts kept, drafts kept to re-measure a paused request, drafts dropped
#: because they do not pay, drafts dropped on the client's request, or no draft to keep
#: (no n-gram match, or the request is still prefilling).
Decision = Literal["draft", "probe", "paused", "off", "none"]


def step_time(cost: Sequence[tuple[int, float]], tokens: float) -> float:
    """Piecewise-linear ``T(tokens)`` through the measured points, extended by the end slopes."""
    segment = next((i for i in range(1, len(cost) - 1) if tokens <= cost[i][0]), len(cost) - 1)
    (x0, y0), (x1, y1) = cost[segment - 1], cost[segment]
    return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)


def choose_ks(gains: Sequence[Sequence[float]], cost: Callable[[float], float]) -> list[int]:
    """k per row maximising the batch's expected tokens per unit of step time.

    ``gains[row][j]`` is what the row's (j+1)-th draft token adds to its expected tokens (not
    increasing in j); ``cost(n)`` is the time of this batch's step verifying n tokens. Every
    row emits at least one token per step. Candidates are taken best-first while they raise
    ``sum(expected tokens) / cost(tokens verified)``.
    """
    ks = [0] * len(gains)
    candidates = sorted(
        ((gain, row) for row, row_gains in enumerate(gains) for gain in row_gains), reverse=True
    )
    gained, verified = float(len(gains)), float(len(gains))
    for gain, row in candidates:
        if (gained + gain) / cost(verified + 1) <= gained / cost(verified):
            break
        ks[row] += 1
        gained, verified = gained + gain, verified + 1
    return ks


@dataclass
class StepCost:
    """Step time ``T(B, n) = s * (P(B) + r * (P(n) - P(B)))`` for B rows verifying n tokens.

    ``P`` is the profile's measured curve. It was measured on other prompts and another load,
    with every draft token verified by one copying prompt, so two factors are learned from this
    engine's own steps, as decayed ratios of sums that start at the prior (1.0) with the weight
    of one step:

    * ``s``, the speed of a plain step: time over ``P(B)`` on steps without drafts;
    * ``r``, the cost of verified drafts against the curve: the time above ``s * P(B)`` over
      ``s * (P(n) - P(B))`` on steps with drafts.

    Only the curve's shape decides k (``s`` cancels in :func:`choose_ks`); ``s`` is learned so
    that ``r`` is measured against the current speed of a plain step.
    """

    prior: tuple[tuple[int, float], ...]
    #: Decayed sums (observed, predicted) behind ``s`` and ``r``, in ms.
    speed_sums: tuple[float, float] = (0.0, 0.0)
    draft_sums: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        (_, t0), (_, t1) = self.prior[:2]
        self.speed_sums = (t0, t0)
        self.draft_sums = (t1 - t0, t1 - t0)

    @property
    def speed(self) -> float:
        return self.speed_sums[0] / self.speed_sums[1]

    @property
    def draft_ratio(self) -> float:
        """``r``: verified draft tokens cost r times what the prior curve says (never < 0)."""
        return max(self.draft_sums[0], 0.0) / self.draft_sums[1]

    def time(self, rows: int, tokens: float) -> float:
        """Expected step time, in units of the prior curve (the speed factor left out)."""
        base = step_time(self.prior, rows)
        return base + self.draft_ratio * (step_time(self.prior, tokens) - base)

    def observe(self, rows: int, tokens: int, ms: float) -> None:
        """A step in which ``rows`` decoding rows verified ``tokens`` tokens took ``ms``."""
        base = step_time(self.prior, rows)
        # One stall (a GC pause, another process on the core) must not swing the estimate.
        expected = self.speed * self.time(rows, tokens)
        ms = min(max(ms, 0.25 * expected), 4.0 * expected)
        if tokens == rows:
            self.speed_sums = _decayed(self.speed_sums, ms, base)
        else:
            extra = step_time(self.prior, tokens) - base
            self.draft_sums = _decayed(self.draft_sums, ms / self.speed - base, extra)


def _decayed(sums: tuple[float, float], observed: float, predicted: float) -> tuple[float, float]:
    return COST_DECAY * sums[0] + observed, COST_DECAY * sums[1] + predicted


@dataclass
class Acceptance:
    """Decayed counts per draft position: verifications that reached it, and that accepted it."""

    k: int
    decay: float
    reached: list[float] = field(init=False)
    accepted: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.reached, self.accepted = [0.0] * self.k, [0.0] * self.k

    def observe(self, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` tokens accepted the first ``accepted`` of them."""
        for j in range(min(drafted, accepted + 1, self.k)):
            self.reached[j] = self.decay * self.reached[j] + 1.0
            self.accepted[j] = self.decay * self.accepted[j] + (1.0 if j < accepted else 0.0)

    def rates(self, prior: Sequence[float], weight: float) -> list[float]:
        """Acceptance per position, ``prior`` counting as ``weight`` verifications."""
        return [
            (a + weight * p) / (r + weight)
            for a, r, p in zip(self.accepted, self.reached, prior, strict=True)
        ]


@dataclass
class RequestState:
    """One request's acceptance per draft position and its probing state."""

    acceptance: Acceptance
    #: Consecutive steps with a draft available but k=0 chosen. A new request starts one step
    #: short of a probe: its first draft is verified whatever the prior, so that the estimate
    #: rests on a measurement before the request is paused.
    paused_steps: int = PROBE_INTERVAL - 1
    #: The drafts being verified are a probe's.
    probing: bool = False

    def observe(self, drafted: int, accepted: int) -> None:
        self.acceptance.observe(drafted, accepted)
        if self.probing and accepted == drafted:
            # The request may be copying again: probe next step, not PROBE_INTERVAL steps on.
            self.paused_steps = PROBE_INTERVAL - 1
        self.probing = False


@dataclass(frozen=True)
class Row:
    """One batch row as the policy sees it."""

    key: Hashable
    #: Tokens sampled for the row this step (accepted drafts + 1); 0 while it is prefilling.
    sampled: int
    #: Drafts that were verified for the row this step.
    verified_drafts: int
    #: Draft tokens the ngram lookup offers for the next step.
    available: int
    off: bool = False


@dataclass
class AdaptivePolicy:
    """Estimates per request key and for the whole batch; k per row per step."""

    cost: StepCost
    #: The profile's maximum k.
    k: int
    states: dict[Hashable, RequestState] = field(default_factory=dict)
    pooled: Acceptance = field(init=False)
    #: When the previous step was called, and which of its rows were decoding then.
    last_call: float | None = None
    decoding: frozenset[Hashable] = frozenset()

    def __post_init__(self) -> None:
        self.pooled = Acceptance(self.k, POOLED_DECAY)

    def pooled_rates(self) -> list[float]:
        """The batch's acceptance per draft position (0.5 before any verification)."""
        return self.pooled.rates([0.5] * self.k, 2 * PRIOR_WEIGHT)

    def rates(self, key: Hashable, pooled: Sequence[float] | None = None) -> list[float]:
        """A request's acceptance per draft position, the pooled rates as its prior."""
        prior = self.pooled_rates() if pooled is None else pooled
        return self.states[key].acceptance.rates(prior, PRIOR_WEIGHT)

    def step(self, rows: Sequence[Row], now: float) -> tuple[list[int], list[Decision]]:
        """Record the step that just ran (called at ``now``, seconds), then choose the next
        step's k and say why per row."""
        self._time_step(rows, now)
        live = {row.key for row in rows}
        for gone in self.states.keys() - live:
            del self.states[gone]
        for row in rows:
            state = self.states.setdefault(row.key, RequestState(Acceptance(self.k, DECAY)))
            if row.verified_drafts and row.sampled:
                state.observe(row.verified_drafts, row.sampled - 1)
                self.pooled.observe(row.verified_drafts, row.sampled - 1)
        wanted = [0 if row.off else min(row.available, self.k) for row in rows]
        pooled = self.pooled_rates()
        gains = [
            list(accumulate(self.rates(row.key, pooled)[:n], operator.mul))
            for row, n in zip(rows, wanted, strict=True)
        ]
        ks = choose_ks(gains, lambda tokens: self.cost.time(len(rows), tokens))
        decisions: list[Decision] = []
        for i, row in enumerate(rows):
            state = self.states[row.key]
            if row.off:
                decisions.append("off")
            elif not wanted[i]:
                decisions.append("none")
            elif ks[i]:
                state.paused_steps = 0
                decisions.append("draft")
            elif state.paused_steps + 1 >= PROBE_INTERVAL:
                state.paused_steps, state.probing = 0, True
                ks[i] = min(wanted[i], PROBE_TOKENS)
                decisions.append("probe")
            else:
                state.paused_steps += 1
                decisions.append("paused")
        return ks, decisions

    def _time_step(self, rows: Sequence[Row], now: float) -> None:
        """The time since the previous call is the step that just ran. It measures decoding
        only if every row was decoding before it and sampled in it: a step with a prefill
        chunk, or after an idle engine, is left out."""
        decoding = frozenset(row.key for row in rows if row.sampled)
        steady = len(decoding) == len(rows) > 0 and decoding <= self.decoding
        if self.last_call is not None and steady:
            tokens = sum(1 + row.verified_drafts for row in rows)
            self.cost.observe(len(rows), tokens, 1000.0 * (now - self.last_call))
        self.last_call, self.decoding = now, decoding
