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
* A step costs ``T(n)`` for n tokens verified across the batch (the profile's ``step_cost``,
  measured). Draft tokens of all requests are taken best-first while they raise the batch's
  expected tokens per unit of time; a request whose drafts stop paying gets k=0 and is probed
  again every :data:`PROBE_INTERVAL` of its steps.
* A request sent with ``extra_args={"speculation": "off"}`` never gets drafts.

Rows of the batch move between steps (requests finish, the batch is condensed), so state is
keyed by the request id of the row, read from the runner's input batch in the same step: the
proposer finds that runner when it is built (it is called from the runner's constructor) and
checks, every step, that the arrays it is given are that batch's arrays.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Hashable, Sequence
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
#: Weight of past observations per new one: the estimate follows about the last 5 verifications.
DECAY = 0.8
#: Prior pseudo-counts (accepted, rejected): a new request starts at a = 0.5, weakly held.
PRIOR = (1.0, 1.0)

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
    rates: Sequence[float], available: Sequence[int], cost: Sequence[tuple[int, float]]
) -> list[int]:
    """k per row maximising the batch's expected tokens per unit of step time.

    Every row emits at least one token per step. The j-th draft token of a row adds
    ``E(j) - E(j-1) = a^j`` expected tokens and one token of verification work; candidates are
    taken best-first while they raise ``sum(expected tokens) / T(tokens verified)``.
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
        if (gained + gain) / step_time(cost, verified + 1) <= gained / step_time(cost, verified):
            break
        ks[row] += 1
        gained, verified = gained + gain, verified + 1
    return ks


@dataclass
class RequestState:
    """One request's acceptance estimate (decayed counts of accepted and rejected drafts)."""

    accepted: float = PRIOR[0]
    rejected: float = PRIOR[1]
    #: Consecutive steps with a draft available but k=0 chosen. A new request starts one step
    #: short of a probe: its first draft is verified whatever the prior, so that the estimate
    #: rests on a measurement before the request is paused.
    paused_steps: int = PROBE_INTERVAL - 1

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` tokens accepted the first ``accepted`` of them."""
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (1 if accepted < drafted else 0)


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

    cost: tuple[tuple[int, float], ...]
    states: dict[Hashable, RequestState] = field(default_factory=dict)

    def step(self, rows: Sequence[Row]) -> tuple[list[int], list[Decision]]:
        """Record this step's verifications, then choose next step's k and say why per row."""
        live = {row.key for row in rows}
        for gone in self.states.keys() - live:
            del self.states[gone]
        for row in rows:
            state = self.states.setdefault(row.key, RequestState())
            if row.verified_drafts and row.sampled:
                state.observe(row.verified_drafts, row.sampled - 1)
        wanted = [0 if row.off else row.available for row in rows]
        states = [self.states[row.key] for row in rows]
        ks = choose_ks([s.rate for s in states], wanted, self.cost)
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
                state.paused_steps = 0
                ks[i] = wanted[i]
                decisions.append("probe")
            else:
                state.paused_steps += 1
                decisions.append("paused")
        return ks, decisions


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
        self.policy = AdaptivePolicy(cost=self.settings.step_cost)
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
        ks, decisions = self.policy.step(rows)
        for decision in decisions:
            self._decisions.labels(decision=decision).inc()
        return [draft[:k] for draft, k in zip(drafts, ks, strict=True)]

    def _is_off(self, req_id: str) -> bool:
        params = self._runner.requests[req_id].sampling_params
        return bool(params and params.extra_args and params.extra_args.get(SWITCH_KEY) == "off")

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load: the drafts come from the request's own tokens."""
