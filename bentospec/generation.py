"""Run one request through the engine for the service's own APIs (``/generate*``, OPEA).

The OpenAI routes do not come through here: vLLM's own serving layer handles them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from bentospec import vllm_api
from bentospec.adaptive import SWITCH_KEY
from bentospec.engine import SpecEngine
from bentospec.errors import RequestRejected, rejected
from bentospec.metrics import SpecCounters
from bentospec.profile import Profile
from bentospec.schemas import GenerateResult, SamplingOptions, SpeculationStats

if TYPE_CHECKING:
    from bentospec.vllm_api import RequestOutput, SamplingParams, TokensPrompt

logger = logging.getLogger(__name__)


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
    The prompt's token count is checked by :func:`tokenized`.
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
    check_sampling(engine, min_p=options.min_p, temperature=options.temperature)
    spec = profile.speculative
    if options.speculation == "off" and spec is not None and spec.method != "adaptive-ngram":
        raise RequestRejected(
            "speculation",
            f"'off' needs a profile with method 'adaptive-ngram'; {profile.name!r} uses "
            f"{spec.method!r}, which vLLM applies to every request alike",
        )


async def tokenized(
    engine: SpecEngine, prompt: str, *, chat: bool = False, prompt_field: str = "prompt"
) -> TokensPrompt:
    """The token ids the engine runs; 400 if they leave no room to generate.

    Tokenized off the event loop, and before the response starts so a stream can still get 400.
    ``chat`` makes ``prompt`` the user turn of the model's chat template with its special-token
    strings kept as text: for untrusted text (OPEA query and documents). Raises
    :class:`EngineUnavailable` if the engine is not ready.
    """
    ids = await (engine.encode_chat(prompt) if chat else engine.encode(prompt))
    limit = engine.profile.engine.max_model_len
    if len(ids) >= limit:
        raise RequestRejected(
            prompt_field,
            f"{len(ids)} tokens leaves no room to generate within max_model_len={limit}",
        )
    return vllm_api.tokens_prompt(ids)


def check_sampling(
    engine: SpecEngine, *, min_p: float, temperature: float | None, logit_bias: object = None
) -> None:
    """Refuse sampling settings the profile's speculation cannot honour (HTTP 400).

    vLLM's own rule (``SamplingParams._validate_spec_decode``), for every API: with speculation,
    ``min_p`` on a sampled request and ``logit_bias`` are refused; greedy requests (temperature
    0: vLLM samples at any temperature above it, :func:`vllm_api.applies_min_p`) drop
    ``min_p``. vLLM refuses a streamed request only after its stream started, as an error
    event, and without naming the field: checking first gives every client a 400 naming it.
    """
    if engine.profile.speculative is None:
        return
    # The model's default temperature matters only to a request that sets min_p.
    runs_at = request_temperature(temperature, engine.generation_defaults()) if min_p else None
    if runs_at is not None and vllm_api.applies_min_p(min_p=min_p, temperature=runs_at):
        raise RequestRejected(
            "min_p",
            f"vLLM does not support min_p with speculative decoding unless the request is "
            f"greedy (temperature 0; vLLM samples at any temperature above 0): got min_p={min_p} "
            f"at temperature={runs_at}; send min_p 0, or temperature 0",
        )
    if logit_bias:
        raise RequestRejected(
            "logit_bias", "vLLM does not support logit_bias with speculative decoding"
        )


def request_temperature(temperature: float | None, defaults: Mapping[str, Any] | None) -> float:
    """The temperature a request runs at: its own, else the model's generation config
    (``defaults``), else vLLM's 1.0, as in ``vllm serve``."""
    if temperature is not None:
        return temperature
    return float((defaults or {}).get("temperature", 1.0))


def sampling_params(
    options: SamplingOptions, *, stream: bool, defaults: Mapping[str, Any] | None = None
) -> SamplingParams:
    """vLLM's ``SamplingParams`` for ``options``: the one place requests become them.

    ``defaults`` is the model's generation config (:meth:`SpecEngine.generation_defaults`).
    """
    sampling_fields = set(SamplingOptions.model_fields) - {"stop", "temperature", SWITCH_KEY}
    return vllm_api.sampling_params(
        stream=stream,
        **options.model_dump(include=sampling_fields),
        temperature=request_temperature(options.temperature, defaults),
        stop=list(options.stop) or None,
        # Read per request by the adaptive-ngram proposer in the engine core.
        extra_args={SWITCH_KEY: "off"} if options.speculation == "off" else None,
    )


def speculation_stats(profile: Profile, output: RequestOutput) -> SpeculationStats:
    """This request's speculation figures, and why speculation did not run when it did not."""
    spec = profile.speculative
    if spec is None:
        return SpeculationStats(method=None, applied=False, reason="profile has no speculation")
    summary = vllm_api.request_spec_summary(output)
    stats = SpecCounters.from_request(summary)
    steps: dict[str, Any] = {}
    if generated := vllm_api.generated_tokens(output):
        # Each decoding step after the prefill's first token emits 1 + its accepted drafts.
        decode_steps = generated - 1 - stats.accepted_tokens
        steps = {
            "steps_with_drafts": stats.drafts,
            "steps_without_drafts": max(decode_steps - stats.drafts, 0),
        }
    if vllm_api.REQUEST_STEP_DRAFTS in summary:
        steps["drafts_per_step"] = summary[vllm_api.REQUEST_STEP_DRAFTS]
    if stats.draft_tokens == 0:
        reason = "the engine proposed no draft tokens for this request"
        logger.info("request %s ran without speculation: %s", output.request_id, reason)
        return SpeculationStats(method=spec.method, applied=False, reason=reason, **steps)
    return SpeculationStats(
        **steps,
        method=spec.method,
        applied=True,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
        mean_acceptance_length=stats.mean_acceptance_length,
    )


def request_params(engine: SpecEngine, options: SamplingOptions, *, stream: bool) -> SamplingParams:
    """The request's ``SamplingParams`` (deltas if ``stream``), checked as vLLM checks them when
    the request is added: vLLM's refusal is raised as :class:`RequestRejected` naming the
    field, here, before any response starts, so that every route answers it with a 400."""
    try:
        params = sampling_params(options, stream=stream, defaults=engine.generation_defaults())
        vllm_api.verify_params(engine.llm, params)
    except vllm_api.request_refusals() as exc:
        raise rejected(exc, SamplingOptions.model_fields) from exc
    return params


async def _generated(
    engine: SpecEngine, prompt: str | TokensPrompt, params: SamplingParams
) -> AsyncIterator[RequestOutput]:
    """``engine.generate``, with a refusal of vLLM's checks beyond the params (raised when the
    request is added, before its first output) as :class:`RequestRejected` too."""
    try:
        async for output in engine.generate(prompt, params):
            yield output
    except vllm_api.request_refusals() as exc:
        raise rejected(exc, SamplingOptions.model_fields) from exc


def stream_outputs(
    engine: SpecEngine, prompt: str | TokensPrompt, options: SamplingOptions
) -> AsyncIterator[RequestOutput]:
    """Delta outputs of one request, checked now (:func:`request_params`); closing the iterator
    aborts the engine request."""
    return _generated(engine, prompt, request_params(engine, options, stream=True))


async def stream_text(
    engine: SpecEngine, prompt: str | TokensPrompt, options: SamplingOptions
) -> AsyncIterator[str]:
    """Text deltas of one request; closing the iterator aborts the engine request."""
    async for output in stream_outputs(engine, prompt, options):
        if output.outputs and output.outputs[0].text:
            yield output.outputs[0].text


async def generate_full(
    engine: SpecEngine, prompt: str | TokensPrompt, options: SamplingOptions
) -> GenerateResult:
    """Run one request to completion and report its tokens and speculation stats."""
    final: RequestOutput | None = None
    async for output in _generated(engine, prompt, request_params(engine, options, stream=False)):
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
