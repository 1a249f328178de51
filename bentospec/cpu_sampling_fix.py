"""vLLM plugin: two CPU fixes to the rejection sampler, so sampling with speculation works.

1. **The expand kernel.** vLLM 0.32's CPU backend replaces the rejection sampler's Triton
   kernels with C++ fallbacks (``CpuPlatform.register_triton_kernel_overrides``). Its
   ``_expand_kernel_impl`` passes ``output.to(torch.int64)`` to the C++ kernel: for the float32
   temperatures and the int32 top-k values that is a temporary copy, so the kernel's writes are
   lost and ``output`` keeps the uninitialised memory of ``new_empty`` (floats are also
   truncated to integers on the way). With speculation on, sampling then uses random per-token
   temperatures (corrupted text) and random top-k values (an index error that kills the engine
   core). vllm-project/vllm#55005, fix PR #55006 (not merged).
2. **Steps with no draft.** With a speculative config vLLM builds spec-decode metadata for every
   step, also when no row has a draft (every prefill, every step where ngram finds no match), so
   the rejection sampler constrains zero target rows; the CPU top-k path
   (``apply_top_k_only``, taken when a request sets ``top_k`` without ``top_p``) calls
   ``k.max()`` on the empty tensor and kills the engine core. Such steps now skip the
   constraints: there is nothing to constrain.

See ``docs/upstream/`` for both reports.

vLLM runs ``vllm.general_plugins`` entry points in every process (the engine core included)
*before* the platform registers its kernel overrides, and the platform reads
``cpu_triton_utils._expand_kernel_impl`` when it registers: replacing that attribute here is
enough. The rejection sampler looks ``apply_sampling_constraints`` up in its module at every
step, so that attribute is replaced the same way. Each replacement is installed only where its
reproducer shows the bug, so this module is a no-op on CUDA and on a vLLM that has fixed both;
delete it then.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

#: The entry-point name in ``pyproject.toml``; ``VLLM_PLUGINS`` without it disables the fix.
PLUGIN_NAME = "bentospec_cpu_sampling_fix"

# Under vLLM's logger, so that the line appears in the engine-core process's log as well.
logger = logging.getLogger(f"vllm.plugins.{PLUGIN_NAME}")

ExpandImpl = Callable[..., None]
#: ``apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata) -> logits``.
Constrain = Callable[[Any, Any, Any], Any]
#: ``apply_top_k_top_p(logits, k, p) -> logits``.
TopKTopP = Callable[[Any, Any, Any], Any]


def expand_tokens(
    output: Any,
    input_val: Any,
    cu_num_tokens: Any,
    replace_from: float,
    replace_to: float,
    MAX_NUM_TOKENS: int | None = None,  # the Triton kernel's parameter name, unused
) -> None:
    """Write request ``i``'s value over its tokens ``cu[i-1]:cu[i]`` of ``output``, in place.

    Same contract as vLLM's ``expand_kernel``: values equal to ``replace_from`` become
    ``replace_to`` (greedy temperature 0 -> 1), and ``output``'s dtype is kept.
    """
    import torch

    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(
        input_val == replace_from, torch.full_like(input_val, replace_to), input_val
    )
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded)


def reproduces_bug(impl: ExpandImpl) -> bool:
    """True if ``impl`` loses float or int32 values (the reproducer of ``docs/upstream/``)."""
    import torch

    cu_num_tokens = torch.tensor([2, 5, 6], dtype=torch.int32)
    for values, expected in (
        (torch.tensor([0.7, 0.0, 1.3]), torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0, 1.3])),
        (
            torch.tensor([10, 0, 3], dtype=torch.int32),
            torch.tensor([10, 10, 1, 1, 1, 3], dtype=torch.int32),
        ),
    ):
        output = torch.full((6,), -99, dtype=values.dtype)
        impl(output, values, cu_num_tokens, 0, 1)
        if not torch.equal(output, expected):
            return True
    return False


def skip_empty_steps(constrain: Constrain) -> Constrain:
    """``constrain`` that returns zero-row logits (a step in which no row has a draft) as is."""

    @functools.wraps(constrain)
    def guarded(logits: Any, cu_num_draft_tokens: Any, sampling_metadata: Any) -> Any:
        if logits.shape[0] == 0:
            return logits
        return constrain(logits, cu_num_draft_tokens, sampling_metadata)

    return guarded


def fails_on_empty_steps(top_k_top_p: TopKTopP) -> bool:
    """True if ``top_k_top_p`` raises on zero rows for top-k, top-p or both (CPU top-k does)."""
    import torch

    logits = torch.empty(0, 16)
    k, p = torch.empty(0, dtype=torch.int32), torch.empty(0)
    for args in ((k, None), (None, p), (k, p)):
        try:
            top_k_top_p(logits.clone(), *args)
        except Exception:
            return True
    return False


def register() -> None:
    """``vllm.general_plugins`` entry point: install each fix where its bug reproduces."""
    from bentospec import vllm_api

    if not vllm_api.is_cpu_platform():
        return
    cpu_triton_utils = vllm_api.cpu_kernel_fallbacks()
    try:
        broken = reproduces_bug(cpu_triton_utils._expand_kernel_impl)
    except Exception as exc:  # the C++ op is missing or raises: the fallback cannot run either
        logger.warning("vLLM's CPU expand kernel fails its check (%s): replacing it", exc)
        broken = True
    if broken:
        cpu_triton_utils._expand_kernel_impl = expand_tokens
        logger.info(
            "%s: replaced vLLM's CPU expand kernel, which lost float32/int32 values (per-token "
            "temperature, top-k) under speculative decoding",
            PLUGIN_NAME,
        )
    else:
        logger.info("vLLM's CPU expand kernel is correct: %s leaves it", PLUGIN_NAME)
    sampler = vllm_api.rejection_sampler()
    if fails_on_empty_steps(sampler.apply_top_k_top_p):
        sampler.apply_sampling_constraints = skip_empty_steps(sampler.apply_sampling_constraints)
        logger.info(
            "%s: speculative steps with no draft token skip vLLM's top-k/top-p, whose CPU path "
            "fails on zero rows",
            PLUGIN_NAME,
        )
    else:
        logger.info("vLLM's CPU top-k/top-p takes zero rows: %s leaves it", PLUGIN_NAME)
