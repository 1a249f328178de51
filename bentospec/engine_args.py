"""Turn a profile into the exact keyword arguments of ``vllm.AsyncEngineArgs``.

Kept separate from building the engine so that ``bentospec profiles show`` can print the
resolved arguments (and tests can check GPU profiles) on a machine that cannot run them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bentospec import settings, vllm_api
from bentospec.adaptive import CONFIG_KEY, PROPOSER_CLASS, AdaptiveSettings
from bentospec.cpu_host import HostClass
from bentospec.profile import Profile, SpeculativeSpec

if TYPE_CHECKING:
    from bentospec.vllm_api import AsyncEngineArgs

logger = logging.getLogger(__name__)


def speculative_config(
    spec: SpeculativeSpec | None, draft_model: str | None, host_class: HostClass | None = None
) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` dict; ``draft_model`` is the resolved draft location and
    ``host_class`` the CPU's class, which picks the batch-size schedule (``None``: a GPU)."""
    if spec is None:
        return None
    if spec.method == "adaptive-ngram":
        # vLLM loads the proposer class; its settings travel in additional_config.
        return {
            "method": "custom_class",
            "model": PROPOSER_CLASS,
            "num_speculative_tokens": spec.num_speculative_tokens,
        }
    config = spec.model_dump(
        exclude_none=True,
        exclude_defaults=True,
        exclude={"model", "host_schedules", "num_speculative_tokens_per_batch_size"},
    )
    config["method"] = spec.method
    config["num_speculative_tokens"] = spec.num_speculative_tokens
    if spec.model is not None:
        config["model"] = draft_model or spec.model
    if (schedule := spec.schedule_for(host_class)) is not None:
        config["num_speculative_tokens_per_batch_size"] = [list(step) for step in schedule]
    return config


def engine_dtype(profile: Profile) -> str:
    """The ``dtype`` engine argument for ``profile`` on this host.

    A CPU profile's ``auto`` becomes float32 where oneDNN has no bf16 GEMM (x86 with AVX2 but
    no AVX-512 or AMX): there vLLM's bf16 falls back to a GEMM that decoded 1.4x (one request)
    to 3.8x (16 requests) slower than float32 on 2 AVX2 cores, and made a step verifying 5
    drafts cost about 4 plain steps, so speculation did not pay (docs/benchmarks.md).
    Everywhere else ``auto`` stays vLLM's choice (bf16 for bf16 checkpoints), as does any
    dtype the profile names.
    """
    dtype = profile.engine.dtype
    if dtype != "auto" or profile.hardware.accelerator != "cpu":
        return dtype
    bf16 = vllm_api.cpu_bf16_gemm()
    if bf16 is False:
        # Debug: engine arguments are built per engine and per bench configuration; the
        # engine's start logs the dtype it got.
        logger.debug("profile %r: no oneDNN bf16 GEMM on this CPU: dtype float32", profile.name)
        return "float32"
    return dtype


def engine_kwargs(
    profile: Profile, *, model: str | None = None, draft_model: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``AsyncEngineArgs``.

    ``model`` / ``draft_model`` are the resolved local paths; left out, the profile's references
    are shown as written (what ``profiles show`` prints before anything is downloaded).
    """
    kwargs: dict[str, Any] = profile.engine.model_dump(exclude_none=True)
    kwargs.update(
        dtype=engine_dtype(profile),
        model=model or profile.model.id,
        served_model_name=[profile.served_model_name],
        trust_remote_code=profile.model.trust_remote_code,
        # Aggregate spec-decode counters (Prometheus) and per-request acceptance stats.
        disable_log_stats=False,
        per_request_spec_decode_metrics="summary" if profile.speculative else "none",
        # BentoML's SIGTERM reaches the engine core too: let it finish streams in flight.
        shutdown_timeout=profile.serving.drain_timeout,
    )
    if settings.ENFORCE_EAGER.get():
        kwargs["enforce_eager"] = True
    if profile.model.revision is not None:
        kwargs["revision"] = profile.model.revision
    if profile.openai.reasoning_parser is not None:
        # As `vllm serve --reasoning-parser`: structured output starts after the thinking.
        kwargs["reasoning_parser"] = profile.openai.reasoning_parser
    spec = speculative_config(profile.speculative, draft_model, profile.hardware.host_class())
    if spec is not None:
        kwargs["speculative_config"] = spec
    if profile.speculative is not None and profile.speculative.step_cost is not None:
        kwargs["additional_config"] = {CONFIG_KEY: adaptive_settings(profile.speculative)}
        # The per-step draft counts are what /generate_full reports as the adapter's k over time.
        kwargs["per_request_spec_decode_metrics"] = "detailed"
    return kwargs


def adaptive_settings(spec: SpeculativeSpec) -> dict[str, Any]:
    """The ``adaptive-ngram`` proposer's settings, as it reads them in the engine core."""
    return AdaptiveSettings(
        num_speculative_tokens=spec.num_speculative_tokens,
        prompt_lookup_min=spec.prompt_lookup_min or spec.prompt_lookup_max or 1,
        prompt_lookup_max=spec.prompt_lookup_max or 1,
        step_cost=spec.step_cost or (),
    ).model_dump(mode="json")


def build_engine_args(
    profile: Profile, *, model: str | None = None, draft_model: str | None = None
) -> AsyncEngineArgs:
    return vllm_api.engine_args(**engine_kwargs(profile, model=model, draft_model=draft_model))
