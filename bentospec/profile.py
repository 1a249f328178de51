"""Hardware profiles: one YAML file in ``configs/`` per hardware target.

A profile says which target model to serve, how to speculate (method, draft model, number of
speculative tokens) and which vLLM engine arguments fit the hardware. It is validated here, at
the boundary, so that a typo fails with the file and key named instead of deep inside vLLM.
"""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bentospec import settings
from bentospec.cpu_host import HostClass, detect_cpu_host
from bentospec.model_store import is_hub_reference

# Profile names are file stems: lower-case words joined by dashes, so that a name can never
# be a path (no "/", no "..") and always maps to exactly one file in the catalogue.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

#: Speculative methods a profile may name (a subset of vLLM 0.32's ``SpeculativeMethod``).
SpeculativeMethod = Literal[
    "ngram",
    "suffix",
    "draft_model",
    "eagle",
    "eagle3",
    "medusa",
    "mlp_speculator",
    "mtp",
    "deepseek_mtp",
    "qwen3_next_mtp",
    "qwen3_5_mtp",
    "glm4_moe_mtp",
    "mimo_mtp",
    "ernie_mtp",
    # bentospec's own: ngram drafts with k chosen per request each step (bentospec/adaptive.py).
    "adaptive-ngram",
]
#: Methods that propose tokens from the prompt/history and so need no draft weights.
MODEL_FREE_METHODS = frozenset({"ngram", "suffix", "adaptive-ngram"})
#: Methods that look drafts up in the request's own tokens (``prompt_lookup_min/max``).
NGRAM_METHODS = frozenset({"ngram", "adaptive-ngram"})

#: ``suffix``'s own settings, passed to vLLM as they are.
SUFFIX_KEYS = (
    "suffix_decoding_max_tree_depth",
    "suffix_decoding_max_cached_requests",
    "suffix_decoding_max_spec_factor",
    "suffix_decoding_min_token_prob",
)

#: One measured point of an engine step's time: (tokens verified in the step, milliseconds).
StepCostPoint = tuple[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]]


class ProfileError(ValueError):
    """A profile is missing, malformed or inconsistent; the message names file, key and fix."""

    @classmethod
    def at_key(cls, profile_name: str, key: str, problem: str, fix: str) -> ProfileError:
        """A pre-flight check's failure: the profile, its key, what is wrong and the fix."""
        return cls(f"profile {profile_name!r}: {key}: {problem}; fix: {fix}")


class _Strict(BaseModel):
    # Attribute docstrings become the fields' descriptions (and a test requires one for each).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class HardwareSpec(_Strict):
    """The machine a profile is written for: drives auto-detection and Bento resources."""

    accelerator: Literal["cpu", "cuda"] = "cpu"
    """What the engine runs on; auto-detection picks a ``cuda`` profile only where CUDA GPUs
    are found."""
    gpu_count: Annotated[int, Field(ge=0)] = 0
    """GPUs the profile needs (BentoCloud reserves them); equals
    ``engine.tensor_parallel_size``, since vLLM uses exactly that many."""
    gpu_memory_gib: Annotated[float, Field(gt=0)] | None = None
    """Memory of one GPU in GiB; the memory check uses it with ``gpu_memory_utilization``."""
    gpu_type: str | None = None
    """BentoCloud ``resources.gpu_type`` (for example ``nvidia-l4``)."""
    gpu_names: tuple[str, ...] = ()
    """Substrings of the CUDA device name this profile fits (``"L4"``, ``"H100"``); empty fits
    any GPU with the memory."""

    def host_class(self) -> HostClass | None:
        """The class of this machine's CPU for a CPU profile (it picks the speculation
        schedule, :meth:`SpeculativeSpec.schedule_for`); ``None`` for a GPU profile."""
        return detect_cpu_host().host_class if self.accelerator == "cpu" else None

    def bento_resources(self) -> dict[str, Any]:
        """``@bentoml.service(resources=...)`` for this hardware (what BentoCloud schedules on)."""
        if self.accelerator == "cpu":
            return {"cpu": "2", "memory": "8Gi"}
        resources: dict[str, Any] = {"gpu": self.gpu_count}
        if self.gpu_type:
            resources["gpu_type"] = self.gpu_type
        return resources

    @model_validator(mode="after")
    def _gpu_fields_match_accelerator(self) -> Self:
        if self.accelerator == "cuda" and (self.gpu_count < 1 or self.gpu_memory_gib is None):
            raise ValueError("a cuda profile needs gpu_count >= 1 and gpu_memory_gib")
        if self.accelerator == "cpu" and self.gpu_count:
            raise ValueError("a cpu profile must have gpu_count 0")
        return self


class ModelSpec(_Strict):
    """The target model."""

    id: Annotated[str, Field(min_length=1)]
    """Hugging Face repo id, local directory, or ``bentospec:<name>`` for a model built
    offline."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load, so a pushed change cannot alter the served
    model; unset: the default branch."""
    served_model_name: str | None = None
    """Name clients use in the OpenAI API (``model`` field); defaults to ``id``."""
    trust_remote_code: bool = False
    """Let vLLM run the model repo's own Python code (models not in transformers)."""


#: One step of a batch-size schedule: (first batch size, last batch size, speculative tokens).
BatchSizeStep = tuple[
    Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=0)]
]


class SpeculativeSpec(_Strict):
    """How to speculate; mirrors the keys of vLLM's ``--speculative-config``."""

    method: SpeculativeMethod
    """How drafts are proposed: from the request's own tokens (``ngram``, ``suffix``,
    ``adaptive-ngram``) or by draft weights (``draft_model``, EAGLE heads, MTP layers)."""
    model: str | None = None
    """Draft model / EAGLE head / MTP weights: repo id, local directory or
    ``bentospec:<name>``; only for the methods that load weights."""
    num_speculative_tokens: Annotated[int, Field(ge=1, le=16)]
    """Draft tokens proposed per step (``k``); the most any schedule may ask for."""
    prompt_lookup_min: Annotated[int, Field(ge=1)] | None = None
    """Ngram methods: the shortest suffix of the request looked up in its earlier tokens."""
    prompt_lookup_max: Annotated[int, Field(ge=1)] | None = None
    """Ngram methods (required there): the longest suffix looked up."""
    draft_tensor_parallel_size: Annotated[int, Field(ge=1)] | None = None
    """GPUs a draft model is sharded over: 1 (a copy on each GPU) or the target's size;
    unset: the target's."""
    num_speculative_tokens_per_batch_size: tuple[BatchSizeStep, ...] | None = None
    """Speculate fewer (or zero) tokens as the batch grows, where verification stops paying
    (``suffix``: the most its match-length drafts may take, :mod:`bentospec.suffix_schedule`)."""
    host_schedules: dict[HostClass, tuple[BatchSizeStep, ...]] | None = None
    """CPU profiles: a ``num_speculative_tokens_per_batch_size`` per host class
    (:mod:`bentospec.cpu_host`), taken at start for the class found, since what a verify
    step costs depends on the class. A class not listed runs the schedule above."""
    suffix_decoding_max_tree_depth: Annotated[int, Field(ge=1)] | None = None
    """``suffix`` only: depth of its suffix trees, the most a prefix match plus its drafts may
    span; unset: vLLM's 24."""
    suffix_decoding_max_cached_requests: Annotated[int, Field(ge=0)] | None = None
    """``suffix`` only: earlier requests kept in the global tree that drafts are also taken
    from; 0 keeps only each request's own prompt tree; unset: vLLM's 10000. A global tree
    remembers earlier answers, so the benchmark never repeats a prompt to such a server."""
    suffix_decoding_max_spec_factor: Annotated[float, Field(ge=0)] | None = None
    """``suffix`` only: drafts per matched token (the draft length follows the match);
    unset: vLLM's 1.0."""
    suffix_decoding_min_token_prob: Annotated[float, Field(ge=0, le=1)] | None = None
    """``suffix`` only: a draft token needs at least this estimated probability (its share of
    the tree's continuations); unset: vLLM's 0.1."""
    use_heterogeneous_vocab: bool = False
    """``draft_model`` only: allow a draft whose vocabulary differs from the target's (the
    pre-flight check refuses one otherwise)."""
    step_cost: tuple[StepCostPoint, ...] | None = None
    """``adaptive-ngram`` only (required there): measured time of one engine step by the number
    of tokens it verifies across the batch, as (tokens, ms) points with rising tokens. The
    proposer keeps a draft token only while it raises the batch's expected tokens per ms.
    This curve is its prior: it rescales the curve from the engine's own step times as it
    runs, and only the curve's shape matters, so points from another host still serve."""

    @model_validator(mode="before")
    @classmethod
    def _reject_removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "disable_by_batch_size" in data:
            raise ValueError(
                "disable_by_batch_size was removed from vLLM; use "
                "num_speculative_tokens_per_batch_size, e.g. [[1, 8, 4], [9, 32, 2], [33, 1024, 0]]"
            )
        return data

    @model_validator(mode="after")
    def _method_settings_are_consistent(self) -> Self:
        if self.method in MODEL_FREE_METHODS:
            if self.model is not None:
                raise ValueError(f"method {self.method!r} takes no draft model: remove 'model'")
        elif self.model is None:
            raise ValueError(f"method {self.method!r} needs 'model' (draft/EAGLE/MTP weights)")
        if self.method not in NGRAM_METHODS and (
            self.prompt_lookup_min is not None or self.prompt_lookup_max is not None
        ):
            raise ValueError("prompt_lookup_min/max only apply to the ngram methods")
        if self.method in NGRAM_METHODS and self.prompt_lookup_max is None:
            raise ValueError(f"method {self.method!r} needs prompt_lookup_max")
        self._check_step_cost()
        lo, hi = self.prompt_lookup_min or 1, self.prompt_lookup_max or 1
        if lo > hi:
            raise ValueError(f"prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
        if self.method != "suffix" and any(getattr(self, key) is not None for key in SUFFIX_KEYS):
            raise ValueError("suffix_decoding_* keys only apply to method 'suffix'")
        if self.use_heterogeneous_vocab and self.method != "draft_model":
            raise ValueError("use_heterogeneous_vocab requires method 'draft_model'")
        self._check_schedule()
        return self

    def schedule_for(self, host_class: HostClass | None) -> tuple[BatchSizeStep, ...] | None:
        """The batch-size schedule on a CPU of ``host_class`` (``None``: not a CPU host)."""
        by_class = self.host_schedules or {}
        if host_class in by_class:
            return by_class[host_class]
        return self.num_speculative_tokens_per_batch_size

    def _check_step_cost(self) -> None:
        if (self.method == "adaptive-ngram") != (self.step_cost is not None):
            raise ValueError("step_cost is required by method 'adaptive-ngram' and only used there")
        if self.step_cost is None:
            return
        if self.num_speculative_tokens_per_batch_size is not None or self.host_schedules:
            raise ValueError(
                "method 'adaptive-ngram' chooses k per request: "
                "remove num_speculative_tokens_per_batch_size"
            )
        points = self.step_cost
        if len(points) < 2:
            raise ValueError("step_cost needs at least two (tokens, ms) points")
        for (n0, t0), (n1, t1) in pairwise(points):
            if n1 <= n0 or t1 < t0:
                raise ValueError(
                    f"step_cost must rise in tokens and not fall in time: ({n0}, {t0}) is "
                    f"followed by ({n1}, {t1})"
                )

    def _check_schedule(self) -> None:
        schedules = {
            "num_speculative_tokens_per_batch_size": self.num_speculative_tokens_per_batch_size,
            **{f"host_schedules.{c}": s for c, s in (self.host_schedules or {}).items()},
        }
        for key, steps in schedules.items():
            self._check_steps(key, steps or ())

    def _check_steps(self, key: str, steps: tuple[BatchSizeStep, ...]) -> None:
        expected_start = 1
        for start, end, k in steps:
            if start != expected_start or end < start:
                raise ValueError(
                    f"{key} must cover batch sizes from 1 upward without gaps or overlaps; got "
                    f"range [{start}, {end}] where [{expected_start}, ...] was expected"
                )
            if k > self.num_speculative_tokens:
                raise ValueError(
                    f"{key} asks for {k} tokens at batch {start}-{end}, more than "
                    f"num_speculative_tokens={self.num_speculative_tokens}"
                )
            expected_start = end + 1


class EngineSpec(_Strict):
    """The vLLM engine arguments a profile may set (names as in ``vllm.AsyncEngineArgs``)."""

    max_model_len: Annotated[int, Field(ge=16)]
    """Longest prompt plus completion, in tokens; the memory check needs one such sequence to
    fit in the KV cache."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weight and activation dtype; a CPU profile's ``auto`` is float32 where the CPU has no
    bf16 GEMM (:func:`bentospec.engine_args.engine_dtype`)."""
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    """GPUs the target is sharded over; equals ``hardware.gpu_count``."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Share of each GPU's memory vLLM may take for weights, activations and KV cache."""
    max_num_seqs: Annotated[int, Field(ge=1)] = 64
    """Sequences batched per step; one more waits in vLLM's queue, so it is also a replica's
    concurrency for scaling (:func:`bentospec.kubernetes.replica_concurrency`)."""
    max_num_batched_tokens: Annotated[int, Field(ge=1)] | None = None
    """Tokens one step may process (prefill chunks included); unset: vLLM's default."""
    kv_cache_memory_bytes: Annotated[int, Field(ge=1)] | None = None
    """KV cache per GPU in bytes, instead of sizing it from ``gpu_memory_utilization``; the way
    to size a CPU engine's cache."""
    kv_cache_dtype: str = "auto"
    """KV cache dtype (``auto``: the model's; ``fp8`` halves it)."""
    quantization: str | None = None
    """vLLM quantization method (``fp8``, ``awq``...); unset: as the checkpoint is."""
    enable_prefix_caching: bool | None = None
    """Reuse the KV cache of shared prompt prefixes; unset: vLLM's default."""
    enforce_eager: bool = False
    """Skip torch.compile and CUDA graphs: faster starts, slower steps
    (``BENTOSPEC_ENFORCE_EAGER=1`` forces it for every profile)."""
    seed: int = 0
    """The engine's random seed (vLLM's ``seed``); requests may set their own."""


class ServingSpec(_Strict):
    """Service-level limits (BentoML ``traffic``)."""

    max_concurrency: Annotated[int, Field(ge=1)] = 32
    """Requests in flight per worker beyond which BentoML answers 503/429 at once."""
    timeout: Annotated[int, Field(ge=1)] = 600
    """Seconds a request may take before BentoML cancels it."""
    drain_timeout: Annotated[int, Field(ge=0)] = 30
    """Seconds a SIGTERM waits for requests in flight before the engine aborts them."""
    max_prompt_chars: Annotated[int, Field(ge=1)] = 200_000
    """Longest accepted prompt, in characters, checked before tokenizing."""


class OpenAISpec(_Strict):
    """How vLLM's OpenAI serving layer renders chats and parses replies (``vllm serve`` flags).

    Parser names are checked against vLLM's registries by ``bentospec profiles check``.
    """

    tool_call_parser: str | None = None
    """``--tool-call-parser``: turns the model's tool-call syntax into ``tool_calls``. Named and
    ``required`` tool choices are forced in that syntax by structured output, so they work even
    on models never trained for tools."""
    enable_auto_tool_choice: bool = False
    """``--enable-auto-tool-choice``: serve tool calls at all. vLLM 0.32 loads the tool parser
    only with this flag, for every ``tool_choice`` (``auto``, ``required``, named), so it goes
    with :attr:`tool_call_parser`."""
    reasoning_parser: str | None = None
    """``--reasoning-parser``: splits the model's thinking into ``reasoning_content``; the engine
    also uses it to start structured output after the thinking ends."""
    chat_template: Path | None = None
    """``--chat-template``: a Jinja file (relative to the project root, e.g. ``prompts/x.jinja``)
    replacing the model's own template, for models whose template cannot show tools."""

    @model_validator(mode="after")
    def _tool_settings_go_together(self) -> Self:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        if self.tool_call_parser is not None and not self.enable_auto_tool_choice:
            raise ValueError(
                "tool_call_parser needs enable_auto_tool_choice: true (vLLM 0.32 loads the "
                "parser only then, and refuses every tool_choice without it)"
            )
        return self

    @property
    def chat_template_file(self) -> Path | None:
        """:attr:`chat_template` resolved against the project root."""
        if self.chat_template is None:
            return None
        return settings.PROJECT_ROOT / self.chat_template


class Profile(_Strict):
    """A validated hardware profile."""

    name: str
    """The catalogue file's stem (never a key in the file, so a name is always one file)."""
    description: str
    """One line for ``bentospec profiles list``."""
    hardware: HardwareSpec = HardwareSpec()
    """The machine it is written for."""
    model: ModelSpec
    """The target model."""
    speculative: SpeculativeSpec | None = None
    """How to speculate; ``None`` serves without speculation."""
    engine: EngineSpec
    """vLLM engine arguments."""
    serving: ServingSpec = ServingSpec()
    """BentoML's limits around the engine."""
    openai: OpenAISpec = OpenAISpec()
    """Tool calling, reasoning and chat template of the OpenAI routes."""

    @model_validator(mode="after")
    def _host_schedules_on_cpu_only(self) -> Self:
        if (
            self.hardware.accelerator != "cpu"
            and self.speculative
            and self.speculative.host_schedules
        ):
            raise ValueError(
                "speculative.host_schedules are chosen by CPU class: a cuda profile sets "
                "num_speculative_tokens_per_batch_size"
            )
        return self

    @property
    def served_model_name(self) -> str:
        return self.model.served_model_name or self.model.id

    def model_refs(self) -> list[str]:
        """The target reference, then the draft's if the method loads one."""
        refs = [self.model.id]
        if self.speculative is not None and self.speculative.model is not None:
            refs.append(self.speculative.model)
        return refs

    def needs_hub_token(self) -> bool:
        """Whether a model comes from the hub, so a Bento or pod of this profile declares
        ``HF_TOKEN`` (gated models need it)."""
        return any(map(is_hub_reference, self.model_refs()))

    def without_speculation(self) -> Profile:
        """The same profile with speculation off: the baseline for speedup and lossless checks."""
        return self.model_copy(update={"speculative": None})

    def drafting_at_every_batch_size(self) -> Profile:
        """The same profile with its batch-size schedules removed, so that its method drafts k
        tokens whatever the batch: the lossless checks verify the method, and they run many
        requests at once, where a schedule may turn drafting off (k=0 from batch 9 on AVX2)."""
        if self.speculative is None:
            return self
        spec = self.speculative.model_copy(
            update={"num_speculative_tokens_per_batch_size": None, "host_schedules": None}
        )
        return self.with_speculative(spec)

    def with_engine(self, **changes: Any) -> Profile:
        """A copy with some engine arguments changed (validated like the file would be)."""
        engine = EngineSpec.model_validate({**self.engine.model_dump(), **changes})
        return self.model_copy(update={"engine": engine})

    def with_speculative(self, spec: SpeculativeSpec | None) -> Profile:
        return self.model_copy(update={"speculative": spec})


def list_profiles(directory: Path | None = None) -> list[str]:
    """Names of the profiles in the catalogue, sorted."""
    directory = directory or settings.CONFIG_DIR.get()
    return sorted(p.stem for p in directory.glob("*.yaml") if _NAME_RE.match(p.stem))


def profile_path(name: str, directory: Path | None = None) -> Path:
    """The file of profile ``name``; refuses anything that is not a catalogue entry."""
    directory = directory or settings.CONFIG_DIR.get()
    valid = list_profiles(directory)
    if not _NAME_RE.match(name) or name not in valid:
        raise ProfileError(
            f"unknown profile {name!r}: valid profiles in {directory} are {', '.join(valid)}"
        )
    return directory / f"{name}.yaml"


def load_profile(name: str, directory: Path | None = None) -> Profile:
    """Load and validate profile ``name`` from the catalogue."""
    return load_profile_file(profile_path(name, directory))


def load_profile_file(path: Path) -> Profile:
    """Load and validate one profile file; errors name the file and the offending key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile must be a YAML mapping, got {type(data).__name__}")
    if "name" in data:
        raise ProfileError(f"{path}: key 'name' is not allowed; the file name is the profile name")
    try:
        return Profile.model_validate({"name": path.stem, **data})
    except ValidationError as exc:
        raise ProfileError(f"{path}: {format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the dotted key (``engine.max_model_len: ...``)."""
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


class _ProfileDumper(yaml.SafeDumper):
    """Block style, but lists of scalars on one line, so a schedule step reads ``[1, 2, 7]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list[object]) -> yaml.SequenceNode:
    flow = not any(isinstance(item, list | dict) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ProfileDumper.add_representer(list, _represent_list)


def profile_yaml(profile: Profile, comment: str) -> str:
    """A profile file that :func:`load_profile_file` reads back as ``profile`` (the name is the
    file's stem), under ``comment`` as ``#`` lines."""
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    data = profile.model_dump(mode="json", exclude={"name"}, exclude_none=True)
    return header + yaml.dump(data, Dumper=_ProfileDumper, sort_keys=False)
