"""The profile catalogue and the errors profile.py raises while loading a file."""

from __future__ import annotations

import re
from itertools import takewhile
from pathlib import Path

import pytest
from pydantic import BaseModel

from bentospec.profile import (
    EngineSpec,
    HardwareSpec,
    ModelSpec,
    OpenAISpec,
    Profile,
    ProfileError,
    ServingSpec,
    SpeculativeSpec,
    list_profiles,
    load_profile,
    load_profile_file,
)
from tests.conftest import BAD_PROFILES, CATALOGUE_DIR, catalogue

#: The catalogue the hardware detection and the docs rely on.
CATALOGUE = {
    "cpu",
    "cpu-draft",
    "l4-24gb",
    "l4-24gb-rag",
    "a100-80gb",
    "h100-80gb",
    "h100-80gb-draft",
    "h100x2",
    "h100x4",
    "h100x4-mtp",
}


def _gpu_profiles() -> list[Profile]:
    return [p for p in catalogue() if p.hardware.accelerator == "cuda"]


def test_catalogue_has_every_profile() -> None:
    assert set(list_profiles(CATALOGUE_DIR)) >= CATALOGUE


@pytest.mark.parametrize("path", sorted(CATALOGUE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_profile_file_starts_with_a_comment(path: Path) -> None:
    """The header says which hardware the file is for and why its numbers are what they are."""
    header = list(takewhile(lambda line: line.startswith("#"), path.read_text().splitlines()))
    assert len(header) >= 3


@pytest.mark.parametrize("profile", _gpu_profiles(), ids=lambda p: p.name)
def test_gpu_profiles_back_off_speculation_at_high_batch(profile: Profile) -> None:
    spec = profile.speculative
    assert spec is not None and spec.num_speculative_tokens_per_batch_size
    steps = spec.num_speculative_tokens_per_batch_size
    assert steps[0][2] == spec.num_speculative_tokens
    assert steps[-1][2] < steps[0][2]
    # The schedule names every batch size the engine can run.
    assert steps[-1][1] == profile.engine.max_num_seqs


@pytest.mark.parametrize("profile", _gpu_profiles(), ids=lambda p: p.name)
def test_gpu_profiles_match_their_hardware(profile: Profile) -> None:
    assert profile.hardware.gpu_names and profile.hardware.gpu_type
    assert profile.engine.tensor_parallel_size == profile.hardware.gpu_count
    assert profile.hardware.bento_resources() == {
        "gpu": profile.hardware.gpu_count,
        "gpu_type": profile.hardware.gpu_type,
    }


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("unknown-key.yaml", r"unknown-key\.yaml: engine\.max_num_seq: unknown key"),
        (
            "disable-by-batch-size.yaml",
            r"disable_by_batch_size was removed from vLLM; use num_speculative_tokens_per_batch",
        ),
        ("schedule-gap.yaml", r"without gaps or overlaps; got range \[10, 32\]"),
        ("suffix-key-on-ngram.yaml", r"suffix_decoding_\* keys only apply to method 'suffix'"),
        ("schedule-overlap.yaml", r"without gaps or overlaps; got range \[8, 32\]"),
        (
            "prompt-lookup-min-above-max.yaml",
            r"prompt_lookup_min \(5\) must be <= prompt_lookup_max \(2\)",
        ),
        ("not-a-mapping.yaml", r"not-a-mapping\.yaml: a profile must be a YAML mapping, got list"),
        ("name-key.yaml", r"name-key\.yaml: key 'name' is not allowed"),
        ("eagle3-without-model.yaml", r"method 'eagle3' needs 'model'"),
        (
            "auto-tool-choice-without-parser.yaml",
            r"openai: Value error, enable_auto_tool_choice needs tool_call_parser",
        ),
        (
            "tool-parser-without-auto-tool-choice.yaml",
            r"openai: Value error, tool_call_parser needs enable_auto_tool_choice: true",
        ),
    ],
)
def test_bad_profile_is_refused_on_load(file: str, message: str) -> None:
    path = BAD_PROFILES / file
    with pytest.raises(ProfileError, match=message) as caught:
        load_profile_file(path)
    assert str(path) in str(caught.value)


def test_bad_profile_is_refused_through_the_config_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "typo.yaml").write_text((BAD_PROFILES / "unknown-key.yaml").read_text())
    monkeypatch.setenv("BENTOSPEC_CONFIG_DIR", str(tmp_path))
    with pytest.raises(
        ProfileError, match=re.escape(f"{tmp_path / 'typo.yaml'}: engine.max_num_seq")
    ):
        load_profile("typo")


#: The vLLM parsers each model family of the catalogue needs: (tool calls, reasoning).
PARSERS_BY_MODEL = {
    "meta-llama/Llama-3": ("llama3_json", None),
    "Qwen/Qwen3-": ("hermes", "qwen3"),
    "zai-org/GLM-4.5": ("glm45", "glm45"),
    # SmolLM2 has no tool syntax of its own: vLLM forces hermes' for named/required choices.
    "bentospec:smollm2-": ("hermes", None),
}


@pytest.mark.parametrize("profile", catalogue(), ids=lambda p: p.name)
def test_every_profile_sets_its_models_parsers(profile: Profile) -> None:
    family = next(f for f in PARSERS_BY_MODEL if profile.model.id.startswith(f))
    openai = profile.openai
    assert (openai.tool_call_parser, openai.reasoning_parser) == PARSERS_BY_MODEL[family]
    assert openai.enable_auto_tool_choice  # vLLM 0.32 loads no tool parser without it


def test_openai_settings_reach_vllm() -> None:
    """The reasoning parser goes to the engine (as `vllm serve` does), the rest to the server."""
    from bentospec.engine import SpecEngine
    from bentospec.engine_args import engine_kwargs
    from bentospec.openai_app import serving_argv

    glm = load_profile("h100x4-mtp", CATALOGUE_DIR)
    assert engine_kwargs(glm)["reasoning_parser"] == "glm45"
    argv = serving_argv(SpecEngine(glm))
    assert argv[argv.index("--tool-call-parser") + 1] == "glm45"
    assert "--enable-auto-tool-choice" in argv and "--chat-template" not in argv
    assert "reasoning_parser" not in engine_kwargs(load_profile("cpu", CATALOGUE_DIR))


@pytest.mark.parametrize(
    "spec",
    [HardwareSpec, ModelSpec, SpeculativeSpec, EngineSpec, ServingSpec, OpenAISpec, Profile],
    ids=lambda cls: cls.__name__,
)
def test_every_profile_field_says_what_it_is(spec: type[BaseModel]) -> None:
    """Each field has a docstring under it (pydantic keeps it as the field's description)."""
    assert [name for name, field in spec.model_fields.items() if not field.description] == []
