"""vLLM plugin: a correct CPU fallback for the rejection sampler's ``expand_kernel``.

vLLM 0.32's CPU backend replaces the rejection sampler's Triton kernels with C++ fallbacks
(``CpuPlatform.register_triton_kernel_overrides``). Its ``_expand_kernel_impl`` passes
``output.to(torch.int64)`` to the C++ kernel: for the float32 temperatures and the int32 top-k
values that is a temporary copy, so the kernel's writes are lost and ``output`` keeps the
uninitialised memory of ``new_empty`` (floats are also truncated to integers on the way). With
speculation on, sampling then uses random per-token temperatures (corrupted text) and random
top-k values (an index error that kills the engine core). See ``docs/upstream/``.

vLLM runs ``vllm.general_plugins`` entry points in every process (the engine core included)
*before* the platform registers its kernel overrides, and the platform reads
``cpu_triton_utils._expand_kernel_impl`` when it registers: replacing that attribute here is
enough. The replacement is installed only where the reproducer shows the bug, so this module is
a no-op on CUDA and on a vLLM that has fixed it; delete it then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

#: The entry-point name in ``pyproject.toml``; ``VLLM_PLUGINS`` without it disables the fix.
PLUGIN_NAME = "bentospec_cpu_sampling_fix"

# Under vLLM's logger, so that the line appears in the engine-core process's log as well.
logger = logging.getLogger(f"vllm.plugins.{PLUGIN_NAME}")

ExpandImpl = Callable[..., None]


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


def register() -> None:
    """``vllm.general_plugins`` entry point: install :func:`expand_tokens` where it is needed."""
    from bentospec import vllm_api

    if not vllm_api.is_cpu_platform():
        return
    cpu_triton_utils = vllm_api.cpu_kernel_fallbacks()
    try:
        broken = reproduces_bug(cpu_triton_utils._expand_kernel_impl)
    except Exception as exc:  # the C++ op is missing or raises: the fallback cannot run either
        logger.warning("vLLM's CPU expand kernel fails its check (%s): replacing it", exc)
        broken = True
    if not broken:
        logger.info("vLLM's CPU expand kernel is correct: %s does nothing", PLUGIN_NAME)
        return
    cpu_triton_utils._expand_kernel_impl = expand_tokens
    logger.info(
        "%s: replaced vLLM's CPU expand kernel, which lost float32/int32 values (per-token "
        "temperature, top-k) under speculative decoding",
        PLUGIN_NAME,
    )
