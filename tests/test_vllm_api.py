"""Contract test of exactly what bentospec takes from vLLM (``bentospec/vllm_api.py``).

After a vLLM upgrade this file says what moved, without starting an engine. The running
behaviour behind these names is covered end to end by the engine and server tests.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import fastapi
import pytest
import torch
import vllm
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.stats import RequestSpecDecodeMetrics
from vllm.v1.spec_decode.ngram_proposer import NgramProposer
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from bentospec import errors, vllm_api
from bentospec.engine_args import engine_kwargs
from bentospec.openai_app import OPENAI_ROUTES, serving_argv
from bentospec.profile import list_profiles, load_profile

pytestmark = pytest.mark.slow


def test_the_pinned_vllm_is_installed() -> None:
    assert vllm.__version__.startswith("0.32.")


def test_every_profile_resolves_to_engine_args_vllm_accepts() -> None:
    # Building the args resolves the model (a download for hub profiles): compare the fields.
    fields = {f.name for f in dataclasses.fields(vllm.AsyncEngineArgs)}
    for name in list_profiles():
        assert set(engine_kwargs(load_profile(name))) <= fields, name


def test_sampling_params_stream_deltas_or_return_the_final_output() -> None:
    stream = vllm_api.sampling_params(stream=True, temperature=0.7, top_k=10, seed=1)
    final = vllm_api.sampling_params(stream=False, extra_args={"speculation": "off"})
    assert stream.output_kind.name == "DELTA" and final.output_kind.name == "FINAL_ONLY"
    assert (stream.temperature, stream.top_k, final.extra_args) == (0.7, 10, {"speculation": "off"})


def test_engine_methods_the_service_calls_exist() -> None:
    for name in ("errored", "generate", "get_tokenizer", "shutdown"):
        assert hasattr(AsyncLLM, name), name
    model_config = inspect.signature(vllm.config.ModelConfig.get_diff_sampling_param)
    assert list(model_config.parameters) == ["self"]


def test_request_outputs_carry_the_per_request_speculation_summary() -> None:
    assert "spec_decode_metrics" in {f.name for f in dataclasses.fields(CompletionOutput)}
    assert "metrics" in inspect.signature(RequestOutput).parameters
    metrics = RequestSpecDecodeMetrics.new(3)
    metrics.observe(num_draft_tokens=3, num_accepted=2, detailed=True)
    summary = metrics.to_dict()
    assert summary[vllm_api.REQUEST_SPEC_STEPS] == 1
    assert summary[vllm_api.REQUEST_DRAFT_TOKENS] == 3
    assert summary[vllm_api.REQUEST_ACCEPTED_TOKENS] == 2
    assert summary[vllm_api.REQUEST_STEP_DRAFTS] == [3]


def test_the_openai_serving_layer_builds_with_the_routes_kept() -> None:
    app = vllm_api.build_serve_app(vllm_api.serve_args(), ("generate",))
    assert isinstance(app, fastapi.FastAPI)
    assert {getattr(r, "path", None) for r in app.router.routes} >= OPENAI_ROUTES
    # The engine failures the service answers itself are ones vLLM's app handles.
    handled = tuple(t for t in app.exception_handlers if isinstance(t, type))
    assert all(issubclass(f, handled) for f in vllm_api.engine_failures())


def test_serve_flags_of_every_profile_parse() -> None:
    class _Engine:
        model_path = "/models/x"

        def __init__(self, name: str) -> None:
            self.profile = load_profile(name)

    for name in list_profiles():
        args = vllm_api.serve_args(serving_argv(_Engine(name)))  # type: ignore[arg-type]
        assert args.served_model_name == [load_profile(name).served_model_name]


def test_parsers_named_by_profiles_are_registered() -> None:
    names = vllm_api.parser_names()
    assert {"hermes", "llama3_json"} <= set(names["tool_call_parser"])
    assert "qwen3" in names["reasoning_parser"]


def test_the_bf16_probe_predicts_vllms_cpu_gemm_dispatch() -> None:
    # A layer of the embedded model's width, dispatched as vLLM does when it loads weights.
    layer = torch.nn.Linear(576, 576, bias=False, dtype=torch.bfloat16)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    uses_onednn = "onednn_mm" in layer.cpu_linear.__code__.co_names
    assert vllm_api.cpu_bf16_gemm() is uses_onednn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_is_the_product_vllms_layers_compute(dtype: torch.dtype) -> None:
    weight = torch.randn(48, 64, dtype=dtype)
    x = torch.randn(6, 64, dtype=dtype)
    expected = torch.nn.functional.linear(x.float(), weight.float())
    torch.testing.assert_close(
        vllm_api.cpu_linear(weight)(x).float(), expected, rtol=2e-2, atol=0.3
    )


@pytest.mark.skipif(not vllm_api.is_cpu_platform(), reason="vLLM runs on a GPU here")
def test_cpu_engine_core_side_names_exist() -> None:
    """What the CPU plugins (``cpu_sampling_fix``, ``cpu_compile_cache_fix``) patch."""
    assert callable(vllm_api.cpu_kernel_fallbacks()._expand_kernel_impl)
    assert issubclass(CPUModelRunner, vllm_api.model_runner_class())


def test_engine_core_side_names_exist() -> None:
    init = inspect.signature(NgramProposer.__init__)
    assert list(init.parameters)[:2] == ["self", "vllm_config"]
    # What suffix_schedule wraps: propose(num_speculative_tokens, input_batch, sampled_ids).
    propose = inspect.signature(vllm_api.suffix_proposer_class().propose)
    assert list(propose.parameters)[:4] == [
        "self",
        "num_speculative_tokens",
        "input_batch",
        "sampled_token_ids",
    ]
    assert isinstance(vllm_api.counter_samples(), list)


@pytest.mark.parametrize("temperature", [0.0, 1e-9, 1e-7, 5e-6, 1e-5, 5e-3, 0.01, 0.5, 2.0])
def test_only_temperature_zero_is_greedy_as_vllm_samples(temperature: float) -> None:
    # vLLM raises 0 < t < 0.01 to 0.01 and samples; what it runs is the rule's ground truth.
    params = vllm.SamplingParams(temperature=temperature, min_p=0.5)
    assert vllm_api.greedy(temperature) is (temperature == 0)
    assert vllm_api.applies_min_p(min_p=0.5, temperature=temperature) is (params.min_p == 0.5)
    assert not vllm_api.applies_min_p(min_p=0.0, temperature=temperature)


def test_vllm_refuses_min_p_and_logit_bias_with_speculation_where_the_rule_says() -> None:
    speculative = SimpleNamespace()  # vLLM only checks that a speculative config is set
    for temperature, min_p, logit_bias in [(1e-7, 0.5, None), (0.0, 0.5, None), (0.0, 0, {1: 2.0})]:
        params = vllm.SamplingParams(temperature=temperature, min_p=min_p, logit_bias=logit_bias)
        refused = vllm_api.applies_min_p(min_p=min_p, temperature=temperature) or bool(logit_bias)
        try:
            params._validate_spec_decode(speculative)
        except vllm_api.request_refusals() as exc:
            assert refused, exc
            assert errors.rejected(exc, ["logit_bias", "min_p"]).field == "min_p"
        else:
            assert not refused


def test_refusals_raised_building_sampling_params_name_their_field() -> None:
    with pytest.raises(vllm_api.request_refusals()) as caught:
        vllm_api.sampling_params(stream=False, temperature=0.0, n=2)
    assert errors.rejected(caught.value, ["temperature", "n"]).field == "n"
    with pytest.raises(vllm_api.request_refusals()) as caught:
        vllm_api.sampling_params(stream=False, top_p=0.0)
    assert errors.rejected(caught.value, ["temperature", "top_p"]).field == "top_p"
