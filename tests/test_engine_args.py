"""Each profile resolves to the vLLM engine arguments it means, and vLLM accepts them.

Constructing ``AsyncEngineArgs`` starts nothing and reads no model config. With
``HF_HUB_OFFLINE=1`` (set by conftest) its ``__post_init__`` maps a hub id to a cached snapshot,
so the arguments are built as ``SpecEngine`` builds them: with resolved local directories.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_args

import pytest
import vllm
from vllm.config.speculative import SpeculativeConfig, SpeculativeMethod
from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

from bentospec import engine_args, settings
from bentospec.engine_args import engine_kwargs
from bentospec.profile import Profile, load_profile
from tests.conftest import CATALOGUE_DIR, catalogue

PROFILES = catalogue()


@pytest.fixture(autouse=True)
def _profile_settings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs engines eager (conftest); these tests resolve the profiles as written."""
    monkeypatch.delenv(settings.ENFORCE_EAGER.name, raising=False)


def test_the_eager_switch_overrides_every_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.ENFORCE_EAGER.name, "1")
    assert all(engine_kwargs(p)["enforce_eager"] is True for p in PROFILES)


def _by_name(name: str) -> Profile:
    return next(p for p in PROFILES if p.name == name)


def _common(**engine: Any) -> dict[str, Any]:
    """Keys every profile resolves to, with the schema defaults of unset engine arguments."""
    return {
        "dtype": "auto",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "kv_cache_dtype": "auto",
        "enforce_eager": False,
        "seed": 0,
        "trust_remote_code": False,
        "disable_log_stats": False,
        "per_request_spec_decode_metrics": "summary",
        "shutdown_timeout": 30,
        **engine,
    }


def test_l4_engine_kwargs() -> None:
    assert engine_kwargs(_by_name("l4-24gb")) == _common(
        model="meta-llama/Llama-3.1-8B-Instruct",
        served_model_name=["llama-3.1-8b-instruct"],
        max_model_len=8192,
        max_num_seqs=32,
        quantization="fp8",
        speculative_config={
            "method": "eagle3",
            "model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B",
            "num_speculative_tokens": 4,
            "num_speculative_tokens_per_batch_size": [[1, 16, 4], [17, 32, 2]],
        },
    )


def test_h100x4_engine_kwargs() -> None:
    assert engine_kwargs(_by_name("h100x4")) == _common(
        model="meta-llama/Llama-3.3-70B-Instruct",
        served_model_name=["llama-3.3-70b-instruct"],
        max_model_len=32768,
        max_num_seqs=128,
        tensor_parallel_size=4,
        speculative_config={
            "method": "draft_model",
            "model": "meta-llama/Llama-3.2-1B-Instruct",
            "num_speculative_tokens": 4,
            "draft_tensor_parallel_size": 1,
            "num_speculative_tokens_per_batch_size": [[1, 16, 4], [17, 48, 2], [49, 128, 0]],
        },
    )


#: Key arguments of the GPU profiles not spelled out in full above: (engine, speculative_config).
KEY_ARGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "l4-24gb-rag": (
        {"quantization": "fp8", "max_model_len": 16384, "enable_prefix_caching": True},
        {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2},
    ),
    "a100-80gb": (
        {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_num_seqs": 128},
        {"method": "eagle3", "model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B"},
    ),
    "h100-80gb": (
        {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_num_seqs": 256},
        {"method": "eagle3", "model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B"},
    ),
    "h100-80gb-draft": (
        {"model": "Qwen/Qwen3-8B", "max_model_len": 32768},
        {"method": "draft_model", "model": "Qwen/Qwen3-0.6B"},
    ),
    "h100x2": (
        {"tensor_parallel_size": 2, "quantization": "fp8"},
        {"method": "eagle3", "model": "yuhuili/EAGLE3-LLaMA3.3-Instruct-70B"},
    ),
    "h100x4-mtp": (
        {"model": "zai-org/GLM-4.5-Air", "tensor_parallel_size": 4, "max_model_len": 65536},
        {"method": "glm4_moe_mtp", "model": "zai-org/GLM-4.5-Air", "num_speculative_tokens": 3},
    ),
}


@pytest.mark.parametrize(("name", "expected"), KEY_ARGS.items())
def test_gpu_profile_key_args(name: str, expected: tuple[dict[str, Any], dict[str, Any]]) -> None:
    engine, speculative = expected
    kwargs = engine_kwargs(_by_name(name))
    assert kwargs.items() >= engine.items()
    assert kwargs["speculative_config"].items() >= speculative.items()


def test_every_gpu_profile_is_covered() -> None:
    covered = {"l4-24gb", "h100x4", *KEY_ARGS}
    assert {p.name for p in PROFILES if p.hardware.accelerator == "cuda"} == covered


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_vllm_accepts_engine_args(profile: Profile, tmp_path: Path) -> None:
    draft = str(tmp_path / "draft") if profile.speculative and profile.speculative.model else None
    kwargs = engine_kwargs(profile, model=str(tmp_path / "target"), draft_model=draft)
    for directory in (kwargs["model"], draft):
        if directory:
            Path(directory).mkdir()
    args = vllm.AsyncEngineArgs(**kwargs)
    assert args.model == str(tmp_path / "target")
    assert args.tensor_parallel_size == profile.engine.tensor_parallel_size
    if profile.speculative is not None:
        assert args.speculative_config == kwargs["speculative_config"]
        if draft is not None:
            assert args.speculative_config["model"] == draft


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.speculative], ids=lambda p: p.name)
def test_speculative_config_is_valid_for_vllm(profile: Profile) -> None:
    """Keys and method are vLLM's; the schedule passes vLLM's own schedule builder."""
    spec = engine_kwargs(profile)["speculative_config"]
    assert set(spec) <= {field.name for field in dataclasses.fields(SpeculativeConfig)}
    assert spec["method"] in get_args(SpeculativeMethod)
    schedule = spec.get("num_speculative_tokens_per_batch_size")
    if schedule is not None:
        max_num_seqs = profile.engine.max_num_seqs
        lookup = build_dynamic_sd_schedule_lookup(
            schedule, max_num_seqs, spec["num_speculative_tokens"]
        )
        # This host's schedule, as vLLM reads it, at both ends of the batch range.
        assert lookup[1] == schedule[0][2] <= spec["num_speculative_tokens"]
        assert lookup[max_num_seqs] == schedule[-1][2]


def _fail_if_probed() -> bool:
    raise AssertionError("a GPU profile's dtype probed the CPU")


@pytest.mark.parametrize(
    ("bf16_gemm", "expected"),
    [(False, "float32"), (True, "auto"), (None, "auto")],
    ids=["avx2-only", "onednn-bf16", "no-onednn"],
)
def test_cpu_auto_dtype_follows_the_bf16_gemm(
    monkeypatch: pytest.MonkeyPatch, bf16_gemm: bool | None, expected: str
) -> None:
    monkeypatch.setattr(engine_args.vllm_api, "cpu_bf16_gemm", lambda: bf16_gemm)
    cpu = load_profile("cpu", CATALOGUE_DIR)
    assert cpu.engine.dtype == "auto"
    assert engine_args.engine_dtype(cpu) == expected
    # A dtype the profile names is kept, whatever the host.
    assert engine_args.engine_dtype(cpu.with_engine(dtype="bfloat16")) == "bfloat16"


def test_gpu_profiles_keep_their_dtype_without_probing_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_args.vllm_api, "cpu_bf16_gemm", _fail_if_probed)
    for profile in PROFILES:
        if profile.hardware.accelerator == "cuda":
            assert engine_args.engine_dtype(profile) == profile.engine.dtype, profile.name
