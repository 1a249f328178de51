"""Per-request adaptive ngram speculation: vLLM's ``custom_class`` proposer of bentospec.

vLLM 0.32 builds the class named by ``speculative_config={"method": "custom_class", "model":
"bentospec.adaptive.AdaptiveNgramProposer"}`` with the ``VllmConfig`` inside its model runner
and calls ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)``
once per step, right after the step's sampled tokens were written into the runner's input
batch. Drafting is vLLM's own :class:`NgramProposer`; :mod:`bentospec.adaptive_policy` decides,
per request and per step, how many of its draft tokens to keep (k from 0 to the profile's
maximum). A request sent with ``extra_args={"speculation": "off"}`` never gets drafts.

Rows of the batch move between steps (requests finish, the batch is condensed), so state is
keyed by the request id of the row, read from the runner's input batch in the same step: the
proposer finds that runner when it is built (it is called from the runner's constructor) and
checks, every step, that the arrays it is given are that batch's arrays.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from bentospec import vllm_api
from bentospec.adaptive_policy import AdaptivePolicy, Row, StepCost

if TYPE_CHECKING:
    import numpy as np

    from bentospec.vllm_api import GPUModelRunner, VllmConfig

#: ``VllmConfig.additional_config`` key holding :class:`AdaptiveSettings`.
CONFIG_KEY = "bentospec_adaptive_ngram"
#: Import path vLLM's ``custom_class`` method loads.
PROPOSER_CLASS = "bentospec.adaptive.AdaptiveNgramProposer"
#: ``SamplingParams.extra_args`` key (OpenAI: ``vllm_xargs``) by which a request turns drafts off.
SWITCH_KEY = "speculation"


class AdaptiveSettings(BaseModel):
    """What the proposer needs from the profile (passed in ``VllmConfig.additional_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_speculative_tokens: int = Field(ge=1)
    prompt_lookup_min: int = Field(ge=1)
    prompt_lookup_max: int = Field(ge=1)
    #: Measured step time by tokens verified in the step, as (tokens, ms) points, tokens rising.
    step_cost: tuple[tuple[int, float], ...] = Field(min_length=2)


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
        self.policy = AdaptivePolicy(
            cost=StepCost(prior=self.settings.step_cost), k=self.settings.num_speculative_tokens
        )
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
