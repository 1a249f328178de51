"""Per-request adaptive ngram speculation: draft only for the requests where drafts pay.

vLLM 0.32 builds the class named by ``speculative_config={"method": "custom_class", "model":
"bentospec.adaptive.AdaptiveNgramProposer"}`` with the ``VllmConfig`` inside its model runner
and calls ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)``
once per step, right after the step's sampled tokens were written into the runner's input
batch. Drafting is vLLM's own :class:`NgramProposer`; this module only decides, per request and
per step, how many of its draft tokens to keep (k from 0 to the profile's maximum):

* Each request keeps an acceptance estimate ``a`` (per draft token, exponentially decayed).
  A step verifying k drafts is expected to emit ``(1 - a^(k+1)) / (1 - a)`` tokens, so the
  j-th draft token adds ``a^j``.
* A step verifying n tokens across a batch of B rows costs ``T(B, n)``: the profile's measured
  ``step_cost`` curve is the prior, and :class:`StepCost` corrects it online from the time
  between the proposer's own calls (see there). Draft tokens of all requests are taken
  best-first while they raise the batch's expected tokens per unit of time.
* A request whose drafts stop paying gets k=0 and is probed with one draft token every
  :data:`PROBE_INTERVAL` of its steps; a probe that is accepted is followed by another at once,
  so a request that starts copying again is back to drafting within a few steps.
* A request sent with ``extra_args={"speculation": "off"}`` never gets drafts.

Rows of the batch move between steps (requests finish, the batch is condensed), so state is
keyed by the request id of the row, read from the runner's input batch in the same step: the
proposer finds that runner when it is built (it is called from the runner's constructor) and
checks, every step, that the arrays it is given are that batch's arrays.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bentospec import vllm_api

if TYPE_CHECKING:
    import numpy as np

    from bentospec.vllm_api import GPUModelRunner, VllmConfig

#: ``VllmConfig.additional_config`` key holding :class:`AdaptiveSettings`.
CONFIG_KEY = "bentospec_adaptive_ngram"
#: Import path vLLM's ``custom_class`` method loads.
PROPOSER_CLASS = "bentospec.adaptive.AdaptiveNgramProposer"
#: ``SamplingParams.extra_args`` key (OpenAI: ``vllm_xargs``) by which a request turns drafts off.
SWITCH_KEY = "speculation"
#: Steps without drafts after which a paused request drafts once more to re-measure acceptance.
PROBE_INTERVAL = 16
#: Draft tokens a probe verifies: one token measures acceptance at a fraction of a full draft's
#: cost, which matters at large batches where most paused requests never copy.
PROBE_TOKENS = 1
#: Weight of past observations per new one: the estimate follows about the last 5 verifications.
DECAY = 0.8
#: Prior pseudo-counts (accepted, rejected): a new request starts at a = 0.5, weakly held.
PRIOR = (1.0, 1.0)
#: Weight of past steps per new one in :class:`StepCost`: it follows about the last 20 steps.
COST_DECAY = 0.95

#: Per row and step: drafts kept, drafts kept to re-measure a paused request, drafts dropped
#: because they do not pay, drafts dropped on the client's request, or no draft to keep
#: (no n-gram match, or the request is still prefilling).
Decision = Literal["draft", "probe", "paused", "off", "none"]


class AdaptiveSettings(BaseModel):
    """What the proposer needs from the profile (passed in ``VllmConfig.additional_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_speculative_tokens: int = Field(ge=1)
    prompt_lookup_min: int = Field(ge=1)
    prompt_lookup_max: int = Field(ge=1)
    #: Measured step time by tokens verified in the step, as (tokens, ms) points, tokens rising.
    step_cost: tuple[tuple[int, float], ...] = Field(min_length=2)


def step_time(cost: Sequence[tuple[int, float]], tokens: float) -> float:
    """Piecewise-linear ``T(tokens)`` through the measured points, extended by the end slopes."""
    segment = next((i for i in range(1, len(cost) - 1) if tokens <= cost[i][0]), len(cost) - 1)
    (x0, y0), (x1, y1) = cost[segment - 1], cost[segment]
    return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a step verifying ``k`` drafts emits on average, the bonus token included."""
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


def choose_ks(
    rates: Sequence[float], available: Sequence[int], cost: Callable[[float], float]
) -> list[int]:
    """k per row maximising the batch's expected tokens per unit of step time.

    ``cost(n)`` is the time of this batch's step verifying n tokens. Every row emits at least
    one token per step. The j-th draft token of a row adds ``E(j) - E(j-1) = a^j`` expected
    tokens and one token of verification work; candidates are taken best-first while they
    raise ``sum(expected tokens) / cost(tokens verified)``.
    """
    ks = [0] * len(rates)
    candidates = sorted(
        (
            (expected_tokens(rate, j) - expected_tokens(rate, j - 1), row)
            for row, rate in enumerate(rates)
            for j in range(1, available[row] + 1)
        ),
        reverse=True,
    )
    gained, verified = float(len(rates)), float(len(rates))
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
class RequestState:
    """One request's acceptance estimate (decayed counts of accepted and rejected drafts)."""

    accepted: float = PRIOR[0]
    rejected: float = PRIOR[1]
    #: Consecutive steps with a draft available but k=0 chosen. A new request starts one step
    #: short of a probe: its first draft is verified whatever the prior, so that the estimate
    #: rests on a measurement before the request is paused.
    paused_steps: int = PROBE_INTERVAL - 1
    #: The drafts being verified are a probe's.
    probing: bool = False

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` tokens accepted the first ``accepted`` of them."""
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (1 if accepted < drafted else 0)
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
    """The decision logic, free of vLLM: estimates per request key, k per row per step."""

    cost: StepCost
    states: dict[Hashable, RequestState] = field(default_factory=dict)
    #: When the previous step was called, and which of its rows were decoding then.
    last_call: float | None = None
    decoding: frozenset[Hashable] = frozenset()

    def step(self, rows: Sequence[Row], now: float) -> tuple[list[int], list[Decision]]:
        """Record the step that just ran (called at ``now``, seconds), then choose the next
        step's k and say why per row."""
        self._time_step(rows, now)
        live = {row.key for row in rows}
        for gone in self.states.keys() - live:
            del self.states[gone]
        for row in rows:
            state = self.states.setdefault(row.key, RequestState())
            if row.verified_drafts and row.sampled:
                state.observe(row.verified_drafts, row.sampled - 1)
        wanted = [0 if row.off else row.available for row in rows]
        states = [self.states[row.key] for row in rows]
        ks = choose_ks(
            [s.rate for s in states], wanted, lambda tokens: self.cost.time(len(rows), tokens)
        )
        decisions: list[Decision] = []
        for i, (row, state) in enumerate(zip(rows, states, strict=True)):
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


def _decision_counter() -> Any:
    """Per-row decisions; under BentoML the engine core inherits its multiprocess metrics dir."""
    from prometheus_client import Counter

    return Counter(
        "bentospec_adaptive_decisions",
        "Per request and step, what the adaptive proposer decided for the next step's drafts.",
        labelnames=["decision"],
        registry=None,
    )


def _calling_model_runner() -> GPUModelRunner:
    """The model runner whose constructor is building this proposer (vLLM passes it no handle)."""
    runner_class = vllm_api.model_runner_class()
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, runner_class):
            return candidate
        frame = frame.f_back
    raise RuntimeError(
        f"{PROPOSER_CLASS} must be built by vLLM's model runner (speculative method custom_class)"
    )


class AdaptiveNgramProposer:
    """vLLM ``custom_class`` proposer: vLLM's ngram drafts, k chosen per request each step."""

    def __init__(self, vllm_config: VllmConfig) -> None:
        spec = vllm_config.speculative_config
        assert spec is not None
        self.settings = AdaptiveSettings.model_validate(vllm_config.additional_config[CONFIG_KEY])
        if self.settings.num_speculative_tokens != spec.num_speculative_tokens:
            raise ValueError("additional_config and speculative_config disagree on k")
        self._runner = _calling_model_runner()
        # vLLM zeroes the lookup window for custom_class: give the ngram drafter its own view.
        ngram_spec = copy.copy(spec)
        ngram_spec.prompt_lookup_min = self.settings.prompt_lookup_min
        ngram_spec.prompt_lookup_max = self.settings.prompt_lookup_max
        ngram_config = copy.copy(vllm_config)
        ngram_config.speculative_config = ngram_spec
        self._ngram = vllm_api.ngram_proposer(ngram_config)
        self.policy = AdaptivePolicy(cost=StepCost(prior=self.settings.step_cost))
        self._decisions = _decision_counter()

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        batch = self._runner.input_batch
        req_ids = batch.req_ids
        if token_ids_cpu is not batch.token_ids_cpu or len(req_ids) != len(sampled_token_ids):
            raise RuntimeError("propose() was called with arrays of another batch")
        drafts = self._ngram.propose(
            self.settings.num_speculative_tokens,
            sampled_token_ids,
            num_tokens_no_spec,
            token_ids_cpu,
        )
        rows = [
            Row(
                key=req_id,
                sampled=len(sampled_token_ids[i]),
                verified_drafts=len(batch.spec_token_ids[i]),
                available=len(drafts[i]),
                off=self._is_off(req_id),
            )
            for i, req_id in enumerate(req_ids)
        ]
        ks, decisions = self.policy.step(rows, time.perf_counter())
        for decision in decisions:
            self._decisions.labels(decision=decision).inc()
        return [draft[:k] for draft, k in zip(drafts, ks, strict=True)]

    def _is_off(self, req_id: str) -> bool:
        params = self._runner.requests[req_id].sampling_params
        return bool(params and params.extra_args and params.extra_args.get(SWITCH_KEY) == "off")

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load: the drafts come from the request's own tokens."""
