"""Pre-flight validation: the catalogue passes, deliberate mistakes fail with the fix named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bentospec import vllm_api
from bentospec.memory import ModelArch
from bentospec.profile import (
    Profile,
    ProfileError,
    list_profiles,
    load_profile,
    load_profile_file,
)
from bentospec.validation import MODEL_CONFIG_DIR, check_profile
from tests.conftest import BAD_PROFILES, CATALOGUE_DIR, ROOT, catalogue

#: SmolLM2-135M-Instruct's config, as `bentospec models prepare` writes it (transformers 5).
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "dtype": "bfloat16",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}


@pytest.fixture(autouse=True)
def empty_model_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No embedded model is built unless a test builds a fake one here."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BENTOSPEC_CACHE", str(cache))
    return cache


def _write_config(directory: Path, **overrides: object) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({**SMOLLM2_CONFIG, **overrides}))
    return directory


def _profile(name: str, **data: object) -> Profile:
    return Profile.model_validate({"name": name, "description": name, **data})


@pytest.mark.parametrize("name", list_profiles(CATALOGUE_DIR))
def test_catalogue_profile_passes(name: str) -> None:
    profile = load_profile(name, CATALOGUE_DIR)
    summary = check_profile(profile)
    assert "\n" not in summary
    if profile.hardware.accelerator == "cuda":
        # Every GPU profile is sized from vendored configs: nothing is skipped.
        assert "skipped" not in summary and "unknown" not in summary
        assert f"sequences of {profile.engine.max_model_len}" in summary
    else:
        assert "CPU profile: GPU memory check skipped" in summary


@pytest.mark.parametrize(
    ("name", "summary"),
    [
        (
            "l4-24gb",
            "weights 9.2 GiB (draft 0.8 GiB) + KV 132 KiB/token: 9.0 GiB for KV = 72k tokens, "
            "8 sequences of 8192 (1x22.5 GiB x 0.9, 2 GiB/GPU reserve)",
        ),
        (
            "h100x4",
            "weights 140.6 GiB (draft 9.2 GiB) + KV 448 KiB/token: 137.9 GiB for KV = 323k tokens, "
            "9 sequences of 32768 (4x79.6 GiB x 0.9, 2 GiB/GPU reserve)",
        ),
        (
            "h100x4-mtp",
            "weights 203.5 GiB (draft 4.4 GiB) + KV 188 KiB/token: 75.1 GiB for KV = 419k tokens, "
            "6 sequences of 65536 (4x79.6 GiB x 0.9, 2 GiB/GPU reserve)",
        ),
        (
            "l4-24gb-rag",
            "weights 8.5 GiB + KV 128 KiB/token: 9.8 GiB for KV = 80k tokens, "
            "4 sequences of 16384 (1x22.5 GiB x 0.9, 2 GiB/GPU reserve)",
        ),
    ],
)
def test_memory_summary(name: str, summary: str) -> None:
    assert check_profile(load_profile(name, CATALOGUE_DIR)) == summary


def test_every_vendored_config_parses_and_is_used() -> None:
    profiles = catalogue()
    used = {p.model.id for p in profiles} | {
        p.speculative.model for p in profiles if p.speculative and p.speculative.model
    }
    vendored = {path.stem.replace("__", "/") for path in MODEL_CONFIG_DIR.glob("*.json")}
    assert vendored == {ref for ref in used if not ref.startswith("bentospec:")}
    for path in MODEL_CONFIG_DIR.glob("*.json"):
        ModelArch.model_validate_json(path.read_text())


@pytest.mark.parametrize(
    ("file", "key", "message"),
    [
        (
            "vocab-mismatch.yaml",
            "speculative.model",
            r"vocab_size 151936 of Qwen/Qwen3-0\.6B differs from 128256 .*use_heterogeneous_vocab",
        ),
        ("draft-tp-3-of-4.yaml", "speculative.draft_tensor_parallel_size", r"set it to 1 or 4"),
        (
            "mtp-without-mtp-layers.yaml",
            "speculative.method",
            r"'deepseek_mtp' needs MTP layers but meta-llama/Llama-3\.1-8B-Instruct has none",
        ),
        ("eagle3-head-of-other-target.yaml", "speculative.model", r"width 4096 .* has 8192"),
        ("eagle-head-as-draft-model.yaml", "speculative.method", r"EAGLE head .*method 'eagle3'"),
        (
            "70b-bf16-on-l4.yaml",
            "hardware.gpu_memory_gib",
            r"weights 131\.4 GiB .* do not fit \(1x22\.5 GiB .*engine\.quantization: fp8",
        ),
        (
            "no-full-sequence.yaml",
            "engine.max_model_len",
            r"= 20k tokens, 0 sequences of 32768 .*lower engine\.max_model_len to <= 19870",
        ),
        ("context-too-long.yaml", "engine.max_model_len", r"65536 exceeds the 40960 tokens"),
        ("tp-not-gpu-count.yaml", "engine.tensor_parallel_size", r"4 but hardware\.gpu_count is 2"),
        ("tp-3-splits-no-heads.yaml", "model.id", r"32 attention / 8 KV heads .* size 3"),
        ("eagle3-with-plain-model.yaml", "speculative.method", r"is not an EAGLE3 head"),
        (
            "unknown-tool-parser.yaml",
            "openai.tool_call_parser",
            r"vLLM has no parser 'llama3'; fix: use one of .*hermes, .*llama3_json, ",
        ),
    ],
)
def test_bad_profile_fails_check(file: str, key: str, message: str) -> None:
    profile = load_profile_file(BAD_PROFILES / file)
    with pytest.raises(ProfileError, match=message) as caught:
        check_profile(profile)
    assert str(caught.value).startswith(f"profile {profile.name!r}: {key}: ")
    assert "; fix: " in str(caught.value)


#: The figures of ``check_profile``'s one-line memory summary.
_SUMMARY = re.compile(
    r"weights (?P<weights>[\d.]+) GiB .*\+ KV (?P<kv_kib>\d+) KiB/token: (?P<kv_gib>[\d.]+) GiB "
    r"for KV = (?P<ktokens>\d+)k tokens, (?P<sequences>\d+) sequences of (?P<length>\d+)"
)


def _summary(profile: Profile) -> dict[str, float]:
    found = _SUMMARY.match(check_profile(profile))
    assert found, check_profile(profile)
    return {key: float(value) for key, value in found.groupdict().items()}


def test_engine_memory_settings_change_the_estimate() -> None:
    l4 = load_profile("l4-24gb", CATALOGUE_DIR)
    default = _summary(l4)
    fixed = _summary(l4.with_engine(kv_cache_memory_bytes=4 * 2**30))
    fp8 = _summary(l4.with_engine(kv_cache_dtype="fp8"))
    assert default["weights"] == fixed["weights"] == fp8["weights"]
    # kv_cache_memory_bytes replaces the utilisation budget with exactly that many bytes.
    assert fixed["kv_gib"] == 4.0 and fixed["kv_kib"] == default["kv_kib"]
    assert fixed["ktokens"] == round(4 * 2**20 / default["kv_kib"] / 1000)
    # An fp8 KV cache holds a token in half of bf16's bytes: twice the tokens in the same space.
    assert fp8["kv_kib"] == default["kv_kib"] / 2 and fp8["kv_gib"] == default["kv_gib"]
    assert abs(fp8["ktokens"] - 2 * default["ktokens"]) <= 1
    for summary in (default, fixed, fp8):
        assert summary["length"] == l4.engine.max_model_len
        assert summary["sequences"] == summary["ktokens"] * 1000 // summary["length"]


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"kv_cache_memory_bytes": 20 * 2**30}, r"hardware\.gpu_memory_gib: .* do not fit"),
        ({"kv_cache_dtype": "fp4"}, r"engine\.kv_cache_dtype: 'fp4' is unknown"),
        ({"quantization": "bitsandbytes"}, r"engine\.quantization: 'bitsandbytes' is unknown"),
    ],
)
def test_engine_memory_settings_can_fail(engine: dict[str, object], message: str) -> None:
    profile = load_profile("l4-24gb", CATALOGUE_DIR).with_engine(**engine)
    with pytest.raises(ProfileError, match=message):
        check_profile(profile)


def test_heterogeneous_vocab_allows_a_different_tokenizer() -> None:
    data = load_profile_file(BAD_PROFILES / "vocab-mismatch.yaml").model_dump()
    data["speculative"]["use_heterogeneous_vocab"] = True
    assert "sequences of 8192" in check_profile(Profile.model_validate(data))


@pytest.mark.parametrize(("bf16_gemm", "dtype_bytes"), [(True, 2), (False, 4)])
def test_built_embedded_models_are_sized(
    empty_model_cache: Path, monkeypatch: pytest.MonkeyPatch, bf16_gemm: bool, dtype_bytes: int
) -> None:
    # The CPU profiles' dtype is auto: bf16 where oneDNN has a bf16 GEMM, else float32.
    monkeypatch.setattr(vllm_api, "cpu_bf16_gemm", lambda: bf16_gemm)
    _write_config(empty_model_cache / "models" / "smollm2-135m-instruct")
    draft_layers = 6
    _write_config(
        empty_model_cache / "models" / "smollm2-135m-draft", num_hidden_layers=draft_layers
    )
    profile = load_profile("cpu-draft", CATALOGUE_DIR)
    summary = check_profile(profile)
    # Derived from the configs written above and the profile: K and V of every layer of both
    # models, in the profile's fixed KV cache.
    c, engine = SMOLLM2_CONFIG, profile.engine
    head_size = c["hidden_size"] // c["num_attention_heads"]
    layers = c["num_hidden_layers"] + draft_layers
    per_token = 2 * layers * c["num_key_value_heads"] * head_size * dtype_bytes
    assert engine.kv_cache_memory_bytes is not None and engine.dtype == "auto"
    tokens = engine.kv_cache_memory_bytes // per_token
    assert summary.endswith(
        f" + KV {per_token / 1024:.0f} KiB/token: {engine.kv_cache_memory_bytes / 2**30:.1f} GiB "
        f"for KV = {tokens / 1000:.0f}k tokens, {tokens // engine.max_model_len} sequences of "
        f"{engine.max_model_len} (CPU profile: GPU memory check skipped)"
    ), summary


def test_unbuilt_embedded_model_is_skipped_not_built(empty_model_cache: Path) -> None:
    summary = check_profile(load_profile("cpu", CATALOGUE_DIR))
    assert summary == (
        "CPU profile: GPU memory check skipped; bentospec:smollm2-135m-instruct not built yet, "
        "size unknown (`bentospec models prepare --profile cpu`)"
    )
    assert not empty_model_cache.exists()


def test_local_model_directory_config_is_read(tmp_path: Path) -> None:
    target = _write_config(tmp_path / "target")
    draft = _write_config(tmp_path / "draft", vocab_size=32000)
    profile = _profile(
        "local",
        model={"id": str(target)},
        speculative={"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3},
        engine={"max_model_len": 4096},
    )
    with pytest.raises(ProfileError, match=r"vocab_size 32000 of .*/draft differs from 49152"):
        check_profile(profile)


def test_local_model_directory_without_config_fails(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    profile = _profile("local", model={"id": str(tmp_path / "empty")}, engine={"max_model_len": 64})
    with pytest.raises(ProfileError, match=r"model\.id: model directory .* has no config\.json"):
        check_profile(profile)


def test_hub_model_without_vendored_config_skips_the_memory_check() -> None:
    profile = _profile(
        "unvendored",
        hardware={"accelerator": "cuda", "gpu_count": 1, "gpu_memory_gib": 79.6},
        model={"id": "example-org/unknown-model"},
        engine={"max_model_len": 4096},
    )
    assert check_profile(profile) == (
        "memory check skipped; model.id size unknown: vendor its config.json as "
        "model_configs/example-org__unknown-model.json"
    )


@pytest.mark.parametrize(
    ("overrides", "note"),
    [
        ({"kv_lora_rank": 512}, "model.id KV cache not sized: multi-head latent attention"),
        (
            {"layer_types": ["linear_attention", "full_attention"]},
            "model.id KV cache not sized: hybrid linear-attention layers",
        ),
        ({"hidden_size": None}, "model.id size unknown: {path} has no usable hidden_size"),
    ],
)
def test_architecture_the_estimate_cannot_size_is_skipped_not_refused(
    tmp_path: Path, overrides: dict[str, object], note: str
) -> None:
    model = _write_config(tmp_path / "model", **overrides)
    profile = _profile(
        "exotic",
        hardware={"accelerator": "cuda", "gpu_count": 1, "gpu_memory_gib": 79.6},
        model={"id": str(model)},
        engine={"max_model_len": 4096},
    )
    expected = note.format(path=model / "config.json")
    assert check_profile(profile) == f"memory check skipped; {expected}"


def test_unmodelled_draft_method_is_noted() -> None:
    profile = _profile(
        "medusa",
        hardware={"accelerator": "cuda", "gpu_count": 1, "gpu_memory_gib": 79.6},
        model={"id": "meta-llama/Llama-3.1-8B-Instruct"},
        speculative={"method": "medusa", "model": "org/medusa-heads", "num_speculative_tokens": 3},
        engine={"max_model_len": 4096},
    )
    assert check_profile(profile) == "memory check skipped; 'medusa' drafts are not checked"


def _cli(*args: str, config_dir: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOSPEC_CONFIG_DIR": str(config_dir), "BENTOSPEC_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "bentospec.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_cli_profiles_check_passes_the_catalogue(empty_model_cache: Path) -> None:
    result = _cli("profiles", "check", config_dir=CATALOGUE_DIR, cache=empty_model_cache)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    names = list_profiles(CATALOGUE_DIR)
    assert lines[-1] == f"{len(names)} passed, 0 failed"
    assert [line.split(":")[0] for line in lines[:-1]] == [f"ok   {name}" for name in names]


@pytest.mark.slow
def test_cli_profiles_check_fails_every_bad_profile(empty_model_cache: Path) -> None:
    result = _cli("profiles", "check", config_dir=BAD_PROFILES, cache=empty_model_cache)
    names = list_profiles(BAD_PROFILES)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == f"0 passed, {len(names)} failed"
    assert all(f"FAIL {name}: " in result.stdout for name in names)


def test_unknown_reasoning_parser_and_missing_chat_template_fail_check() -> None:
    base = {"model": {"id": "bentospec:smollm2-135m-instruct"}, "engine": {"max_model_len": 4096}}
    profile = _profile("p", **base, openai={"reasoning_parser": "qwen"})
    with pytest.raises(ProfileError, match=r"openai\.reasoning_parser: .*'qwen'.* qwen3"):
        check_profile(profile)
    profile = _profile("p", **base, openai={"chat_template": "prompts/missing.jinja"})
    with pytest.raises(ProfileError, match=r"openai\.chat_template: .*missing\.jinja"):
        check_profile(profile)
