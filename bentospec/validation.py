"""Pre-flight checks of a profile, run before any engine starts.

vLLM reports a vocabulary mismatch, a draft tensor-parallel size it cannot use, a method the
model cannot serve or a KV cache too small for one sequence only after minutes of loading
weights, and only on the GPU the profile is written for. These checks read the models'
``config.json`` instead (vendored copies in ``bentospec/model_configs/`` for hub models, the
directory's own for local and built ``bentospec:`` models), so they run in milliseconds on any
machine with no network. Only the OpenAI parser names are read from vLLM (its parser registries,
imported once: a few seconds). ``bentospec profiles check`` prints the summary.
The memory estimate is :mod:`bentospec.memory`'s.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pydantic import ValidationError

from bentospec.memory import DraftKind, ModelArch, memory_summary
from bentospec.model_build import EMBEDDED_PREFIX, embedded_dir
from bentospec.profile import Profile, ProfileError, SpeculativeSpec

#: Vendored ``config.json`` copies of hub models, named ``<org>__<name>.json``.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

_DRAFT_KINDS: dict[str, DraftKind] = {"draft_model": "model", "eagle": "eagle", "eagle3": "eagle3"}


def config_path(ref: str) -> Path:
    """Where the ``config.json`` of a model reference is read from (it may not exist).

    ``bentospec:<name>``: its built directory (never built here: building takes minutes);
    a local directory: its own; a hub id: the vendored copy, as no hub is reachable.
    """
    if ref.startswith(EMBEDDED_PREFIX):
        return embedded_dir(ref.removeprefix(EMBEDDED_PREFIX)) / "config.json"
    if (local := Path(ref).expanduser()).is_dir():
        return local / "config.json"
    return MODEL_CONFIG_DIR / f"{ref.replace('/', '__')}.json"


class _Check:
    """One run of :func:`check_profile`: the profile, and what could not be checked."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.notes: list[str] = []
        #: ``bentospec:`` models whose size is unknown until they are built.
        self.unbuilt: list[str] = []

    def error(self, key: str, problem: str, fix: str) -> ProfileError:
        return ProfileError.at_key(self.profile.name, key, problem, fix)

    def arch(self, ref: str, key: str) -> ModelArch | None:
        """The parsed config of model ``ref`` (named by profile key ``key``), or None if unknown."""
        path = config_path(ref)
        if not path.is_file():
            if ref.startswith(EMBEDDED_PREFIX):
                self.unbuilt.append(ref)
            elif path.parent == MODEL_CONFIG_DIR:
                vendored = f"{MODEL_CONFIG_DIR.name}/{path.name}"
                self.notes.append(f"{key} size unknown: vendor its config.json as {vendored}")
            else:
                raise self.error(
                    key,
                    f"model directory {ref} has no config.json",
                    "point it at a model directory",
                )
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self.error(key, f"cannot read {path}: {exc}", "fix or replace that file") from exc
        try:
            return ModelArch.model_validate(data)
        except ValidationError as exc:  # valid for vLLM, perhaps, but not laid out as we size it
            missing = ", ".join(str(e["loc"][0]) for e in exc.errors(include_url=False))
            self.notes.append(f"{key} size unknown: {path} has no usable {missing}")
            return None

    def finish(self, summary: str) -> str:
        if self.unbuilt:
            self.notes.append(
                f"{' and '.join(self.unbuilt)} not built yet, size unknown "
                f"(`bentospec models prepare --profile {self.profile.name}`)"
            )
        return "; ".join([summary, *self.notes])


def check_profile(profile: Profile) -> str:
    """Check ``profile`` against its models' configs; return a one-line memory summary.

    Raises :class:`ProfileError` naming the profile, the key and the fix.
    """
    check = _Check(profile)
    _check_parallelism(check)
    _check_openai(check)
    spec = profile.speculative
    kind = _draft_kind(spec.method) if spec else None
    if spec is not None and spec.model is not None and kind is None:
        check.notes.append(f"{spec.method!r} drafts are not checked")
    target = check.arch(profile.model.id, "model.id")
    draft = check.arch(spec.model, "speculative.model") if spec and spec.model and kind else None
    if target is not None:
        _check_context(check, target)
        _check_heads(check, target, profile.engine.tensor_parallel_size, "model.id")
        if spec is not None and draft is not None:
            _check_draft(check, spec, target, draft)
    return check.finish(memory_summary(profile, target, draft, kind, check.notes))


def _check_parallelism(check: _Check) -> None:
    profile = check.profile
    tp = profile.engine.tensor_parallel_size
    if profile.hardware.accelerator == "cuda" and tp != profile.hardware.gpu_count:
        raise check.error(
            "engine.tensor_parallel_size",
            f"{tp} but hardware.gpu_count is {profile.hardware.gpu_count}: vLLM uses exactly "
            "tensor_parallel_size GPUs, BentoCloud reserves gpu_count",
            "make them equal",
        )
    spec = profile.speculative
    draft_tp = spec.draft_tensor_parallel_size if spec else None
    if draft_tp is not None and draft_tp not in (1, tp):
        raise check.error(
            "speculative.draft_tensor_parallel_size",
            f"{draft_tp} with engine.tensor_parallel_size {tp}: vLLM runs a draft either on "
            "one GPU (a copy on each) or sharded like the target",
            f"set it to 1 or {tp}",
        )


@functools.cache
def vllm_parser_names() -> dict[str, tuple[str, ...]]:
    """The tool-call and reasoning parser names vLLM's registries know, per profile key."""
    from bentospec import vllm_api

    return dict(vllm_api.parser_names())


def _check_openai(check: _Check) -> None:
    """Parser names that vLLM would refuse only once the engine is loaded, and the template."""
    openai = check.profile.openai
    for key in ("tool_call_parser", "reasoning_parser"):
        name = getattr(openai, key)
        if name is not None and name not in (valid := vllm_parser_names()[key]):
            raise check.error(
                f"openai.{key}", f"vLLM has no parser {name!r}", f"use one of {', '.join(valid)}"
            )
    template = openai.chat_template_file
    if template is not None and not template.is_file():
        raise check.error(
            "openai.chat_template",
            f"{template} is not a file",
            "give a Jinja file relative to the project root",
        )


def _check_context(check: _Check, target: ModelArch) -> None:
    max_len = check.profile.engine.max_model_len
    if target.max_context is not None and max_len > target.max_context:
        raise check.error(
            "engine.max_model_len",
            f"{max_len} exceeds the {target.max_context} tokens {check.profile.model.id} supports",
            f"set engine.max_model_len <= {target.max_context}",
        )


def _check_heads(check: _Check, arch: ModelArch, tp: int, key: str) -> None:
    heads, kv_heads = arch.num_attention_heads, arch.kv_heads
    if heads % tp or (kv_heads % tp and tp % kv_heads):
        raise check.error(
            key,
            f"{heads} attention / {kv_heads} KV heads cannot be split over tensor parallel "
            f"size {tp}",
            "use a tensor parallel size that divides the attention heads",
        )


def _check_draft(check: _Check, spec: SpeculativeSpec, target: ModelArch, draft: ModelArch) -> None:
    """Vocabulary, method and shape consistency of the draft model, EAGLE head or MTP layers."""
    model = check.profile.model.id
    if not spec.use_heterogeneous_vocab and draft.vocab_size != target.vocab_size:
        raise check.error(
            "speculative.model",
            f"vocab_size {draft.vocab_size} of {spec.model} differs from {target.vocab_size} "
            f"of {model}",
            "use a draft with the target's tokenizer, or set "
            "speculative.use_heterogeneous_vocab: true (method draft_model)",
        )
    if _is_mtp(spec.method):
        if draft.mtp_layers < 1:
            raise check.error(
                "speculative.method",
                f"{spec.method!r} needs MTP layers but {spec.model} has none "
                "(num_nextn_predict_layers / mtp_num_hidden_layers is 0)",
                "use a model with MTP layers, or method eagle3 / draft_model with a draft",
            )
        return  # MTP layers are shaped like the target's, which is checked already
    architectures = ", ".join(draft.architectures) or "no architectures"
    if spec.method == "draft_model" and draft.is_eagle_head:
        raise check.error(
            "speculative.method",
            f"'draft_model' but {spec.model} is an EAGLE head ({architectures})",
            "use method 'eagle3' (or 'eagle') for EAGLE heads",
        )
    if spec.method == "eagle3" and not draft.is_eagle3_head:
        raise check.error(
            "speculative.method",
            f"'eagle3' but {spec.model} is not an EAGLE3 head ({architectures})",
            "use an EAGLE3 head trained for the target, or method 'draft_model'",
        )
    width = draft.target_hidden_size or draft.hidden_size
    if spec.method in ("eagle", "eagle3") and width != target.hidden_size:
        raise check.error(
            "speculative.model",
            f"EAGLE head {spec.model} reads hidden states of width {width} but {model} has "
            f"{target.hidden_size}",
            "use the EAGLE head trained for this target",
        )
    draft_tp = spec.draft_tensor_parallel_size or check.profile.engine.tensor_parallel_size
    _check_heads(check, draft, draft_tp, "speculative.model")


def _is_mtp(method: str) -> bool:
    return method == "mtp" or method.endswith("_mtp")


def _draft_kind(method: str) -> DraftKind | None:
    return "mtp" if _is_mtp(method) else _DRAFT_KINDS.get(method)
