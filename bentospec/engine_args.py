"""Turn a profile into the exact keyword arguments of ``vllm.AsyncEngineArgs``.

Kept separate from building the engine so that ``bentospec profiles show`` can print the
resolved arguments (and tests can check GPU profiles) on a machine that cannot run them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bentospec.profile import Profile, SpeculativeSpec

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs


def speculative_config(
    spec: SpeculativeSpec | None, draft_model: str | None
) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` dict; ``draft_model`` is the resolved draft location."""
    if spec is None:
        return None
    config = spec.model_dump(exclude_none=True, exclude_defaults=True, exclude={"model"})
    config["method"] = spec.method
    config["num_speculative_tokens"] = spec.num_speculative_tokens
    if spec.model is not None:
        config["model"] = draft_model or spec.model
    if spec.num_speculative_tokens_per_batch_size is not None:
        config["num_speculative_tokens_per_batch_size"] = [
            list(step) for step in spec.num_speculative_tokens_per_batch_size
        ]
    return config


def engine_kwargs(
    profile: Profile, *, model: str | None = None, draft_model: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``AsyncEngineArgs``.

    ``model`` / ``draft_model`` are the resolved local paths; left out, the profile's references
    are shown as written (what ``profiles show`` prints before anything is downloaded).
    """
    kwargs: dict[str, Any] = profile.engine.model_dump(exclude_none=True)
    kwargs.update(
        model=model or profile.model.id,
        served_model_name=[profile.served_model_name],
        trust_remote_code=profile.model.trust_remote_code,
        # Aggregate spec-decode counters (Prometheus) and per-request acceptance stats.
        disable_log_stats=False,
        per_request_spec_decode_metrics="summary" if profile.speculative else "none",
        # BentoML's SIGTERM reaches the engine core too: let it finish streams in flight.
        shutdown_timeout=profile.serving.drain_timeout,
    )
    if profile.greedy_only:
        # OpenAI requests that leave temperature out get greedy decoding instead of 1.0.
        kwargs["override_generation_config"] = {"temperature": 0.0}
    if profile.model.revision is not None:
        kwargs["revision"] = profile.model.revision
    spec = speculative_config(profile.speculative, draft_model)
    if spec is not None:
        kwargs["speculative_config"] = spec
    return kwargs


def build_engine_args(
    profile: Profile, *, model: str | None = None, draft_model: str | None = None
) -> AsyncEngineArgs:
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(profile, model=model, draft_model=draft_model))
