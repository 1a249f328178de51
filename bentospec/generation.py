"""Run one request through the engine for the service's own APIs (``/generate*``, OPEA).

The OpenAI routes do not come through here: vLLM's own serving layer handles them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from bentospec.engine import SpecEngine
from bentospec.metrics import SpecCounters
from bentospec.profile import Profile
from bentospec.schemas import GenerateResult, SamplingOptions, SpeculationStats

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """The request is invalid for this profile; ``field`` names the offending input (HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_request(
    engine: SpecEngine,
    prompt: str,
    options: SamplingOptions,
    *,
    prompt_field: str = "prompt",
    max_tokens_field: str = "max_tokens",
) -> None:
    """Profile-dependent limits, checked before a response starts so a stream can still get 400.

    The field names are those of the caller's API, so the error names what the client sent.
    Raises :class:`EngineUnavailable` if the engine is not ready.
    """
    profile = engine.profile
    limit = profile.engine.max_model_len
    if options.max_tokens >= limit:
        raise RequestRejected(
            max_tokens_field,
            f"{options.max_tokens} exceeds the model's context: must be < max_model_len={limit}",
        )
    if len(prompt) > profile.serving.max_prompt_chars:
        raise RequestRejected(
            prompt_field,
            f"{len(prompt)} characters exceeds the limit of {profile.serving.max_prompt_chars}",
        )
    check_sampling(profile, options)
    # vLLM tokenizes again; counting here is what lets a streaming request fail with 400.
    prompt_tokens = len(engine.llm.get_tokenizer().encode(prompt))
    if prompt_tokens >= limit:
        raise RequestRejected(
            prompt_field,
            f"{prompt_tokens} tokens leaves no room to generate within max_model_len={limit}",
        )


def check_sampling(profile: Profile, options: SamplingOptions) -> None:
    """Refuse sampling settings the profile's speculation cannot honour (HTTP 400)."""
    if profile.speculative is None:
        return
    if options.min_p > 0:
        raise RequestRejected(
            "min_p", "vLLM does not support min_p with speculative decoding: send 0"
        )
    if profile.greedy_only and (options.temperature or 0) > 0:
        raise RequestRejected(
            "temperature",
            f"{options.temperature}: profile {profile.name!r} speculates on CPU, where vLLM 0.32 "
            "is only exact for greedy decoding: send temperature 0 (or leave it out), or serve "
            "profile 'cpu-nospec' for sampling",
        )


def sampling_params(options: SamplingOptions, profile: Profile, *, stream: bool) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampling_fields = set(SamplingOptions.model_fields) - {"stop", "temperature"}
    temperature = options.temperature
    if temperature is None:
        temperature = 0.0 if profile.greedy_only else 1.0
    return SamplingParams(
        **options.model_dump(include=sampling_fields),
        temperature=temperature,
        stop=list(options.stop) or None,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def speculation_stats(profile: Profile, output: RequestOutput) -> SpeculationStats:
    """This request's speculation figures, and why speculation did not run when it did not."""
    spec = profile.speculative
    if spec is None:
        return SpeculationStats(method=None, applied=False, reason="profile has no speculation")
    metrics = output.outputs[0].spec_decode_metrics if output.outputs else None
    stats = SpecCounters.from_request(metrics.to_dict()) if metrics is not None else SpecCounters()
    if stats.draft_tokens == 0:
        reason = "the engine proposed no draft tokens for this request"
        logger.info("request %s ran without speculation: %s", output.request_id, reason)
        return SpeculationStats(method=spec.method, applied=False, reason=reason)
    return SpeculationStats(
        method=spec.method,
        applied=True,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
        mean_acceptance_length=stats.mean_acceptance_length,
    )


async def stream_outputs(
    engine: SpecEngine, prompt: str, options: SamplingOptions
) -> AsyncIterator[RequestOutput]:
    """Delta outputs of one request; closing the iterator aborts the engine request."""
    async for output in engine.generate(
        prompt, sampling_params(options, engine.profile, stream=True)
    ):
        yield output


async def stream_text(
    engine: SpecEngine, prompt: str, options: SamplingOptions
) -> AsyncIterator[str]:
    """Text deltas of one request; closing the iterator aborts the engine request."""
    async for output in stream_outputs(engine, prompt, options):
        if output.outputs and output.outputs[0].text:
            yield output.outputs[0].text


async def generate_full(
    engine: SpecEngine, prompt: str, options: SamplingOptions
) -> GenerateResult:
    """Run one request to completion and report its tokens and speculation stats."""
    final: RequestOutput | None = None
    async for output in engine.generate(
        prompt, sampling_params(options, engine.profile, stream=False)
    ):
        final = output
    if final is None or not final.outputs:
        raise RuntimeError("engine returned no output")
    completion = final.outputs[0]
    return GenerateResult(
        text=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=len(final.prompt_token_ids or ()),
        completion_tokens=len(completion.token_ids),
        speculation=speculation_stats(engine.profile, final),
    )
