"""What a profile's models put in memory: weights, KV cache per token, and whether it fits.

Sized from the fields of each model's ``config.json`` (:class:`ModelArch`). The estimate is
deliberately simple and errs on the safe side: weights from the parameter count, KV cache from
the attention layers, and a fixed runtime reserve per GPU. :mod:`bentospec.validation` runs it
as one of a profile's pre-flight checks.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from bentospec.engine_args import engine_dtype
from bentospec.profile import Profile, ProfileError

#: Per GPU, besides weights and KV cache: CUDA context, cuBLAS/NCCL workspaces, CUDA graphs and
#: the activation peak vLLM profiles before it sizes the KV cache. 1-3 GiB is typical for 1B-70B
#: models at default batch sizes; 2 GiB keeps the estimate on the safe side.
RUNTIME_RESERVE_GIB = 2.0

_GIB = 2**30

#: Bits per weight of quantized linear layers (embeddings and LM head stay 16-bit in vLLM).
_QUANT_BITS = {"fp8": 8, "fbgemm_fp8": 8, "awq": 4, "awq_marlin": 4, "gptq": 4, "gptq_marlin": 4}
_KV_CACHE_BYTES = {"float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
#: RoPE types whose ``max_position_embeddings`` is already the scaled context (as in vLLM).
_PRESCALED_ROPE = frozenset(
    {"default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}
)

#: Layer types sized as full attention (sliding-window layers cache less: an upper bound).
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention"})

#: How a draft's weights are laid out: a whole model, an EAGLE head, or MTP layers of the target.
DraftKind = Literal["model", "eagle", "eagle3", "mtp"]


class ModelArch(BaseModel):
    """The fields of a Hugging Face ``config.json`` that size a model; the rest is ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    architectures: tuple[str, ...] = ()
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    rope_scaling: dict[str, Any] | None = Field(
        None, validation_alias=AliasChoices("rope_scaling", "rope_parameters")
    )
    quantization_config: dict[str, Any] | None = None
    #: EAGLE3 heads predict over a reduced vocabulary that vLLM maps back to the target's.
    draft_vocab_size: int | None = None
    #: Width of the target hidden states an EAGLE head reads, when it differs from its own.
    target_hidden_size: int | None = None
    num_experts: int = Field(
        0, validation_alias=AliasChoices("num_experts", "n_routed_experts", "num_local_experts")
    )
    moe_intermediate_size: int | None = None
    n_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    #: Leading dense layers before the MoE layers start (DeepSeek, GLM-4.5).
    first_k_dense_replace: int = 0
    num_nextn_predict_layers: int = 0
    mtp_num_hidden_layers: int = 0
    #: Multi-head latent attention (DeepSeek) caches one compressed vector per token and layer.
    kv_lora_rank: int | None = None
    #: Hybrid models interleave attention with linear-attention layers that cache no KV per token.
    layer_types: tuple[str, ...] = ()
    full_attention_interval: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def mtp_layers(self) -> int:
        return max(self.num_nextn_predict_layers, self.mtp_num_hidden_layers)

    @property
    def is_eagle_head(self) -> bool:
        return any("eagle" in arch.lower() for arch in self.architectures)

    @property
    def is_eagle3_head(self) -> bool:
        return any("eagle3" in arch.lower() for arch in self.architectures)

    @property
    def unsized_reason(self) -> str | None:
        """Why the estimate cannot size this model's KV cache, if it cannot."""
        if self.kv_lora_rank:
            return "multi-head latent attention"
        if self.full_attention_interval or set(self.layer_types) - _ATTENTION_LAYERS:
            return "hybrid linear-attention layers"
        return None

    @property
    def max_context(self) -> int | None:
        """The longest context vLLM derives from this config (RoPE scaling included)."""
        if self.max_position_embeddings is None:
            return None
        rope = self.rope_scaling or {}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        factor = 1.0 if rope_type in _PRESCALED_ROPE else float(rope.get("factor") or 1.0)
        return int(self.max_position_embeddings * factor)

    @property
    def quant_method(self) -> str | None:
        return (self.quantization_config or {}).get("quant_method")


class Footprint(NamedTuple):
    """What one model puts on the GPUs, before sharding."""

    #: Decoder-layer matrices: the weights that quantization shrinks.
    linear_params: int
    #: Embeddings, LM head and norms: kept at the model dtype by vLLM's fp8/int4 schemes.
    other_params: int
    #: Attention layers that hold a KV cache entry per token.
    kv_layers: int


class MemoryEstimate(NamedTuple):
    """Weights and KV cache of a profile, summed over its GPUs."""

    weight_bytes: float
    draft_weight_bytes: float
    kv_bytes_per_token: float


def _attention_params(arch: ModelArch, input_width: int) -> int:
    q_width = arch.num_attention_heads * arch.head_size
    kv_width = 2 * arch.kv_heads * arch.head_size
    return input_width * (q_width + kv_width) + q_width * arch.hidden_size


def _mlp_params(arch: ModelArch, layer: int) -> int:
    hidden = arch.hidden_size
    if not arch.num_experts or layer < arch.first_k_dense_replace:
        return 3 * hidden * arch.intermediate_size
    expert_width = arch.moe_intermediate_size or arch.intermediate_size
    shared_width = arch.shared_expert_intermediate_size or arch.n_shared_experts * expert_width
    router = hidden * arch.num_experts
    return 3 * hidden * (arch.num_experts * expert_width + shared_width) + router


def footprint(arch: ModelArch, kind: DraftKind = "model") -> Footprint:
    """Parameters and KV layers of a whole model, an EAGLE head or the MTP layers of ``arch``.

    vLLM shares the target's embeddings with EAGLE heads and MTP layers (and the LM head with
    MTP layers), so those are not counted twice.
    """
    hidden, layers = arch.hidden_size, arch.num_hidden_layers
    if kind == "mtp":
        mtp_layers = range(layers, layers + arch.mtp_layers)
        # Each MTP layer: a decoder layer plus eh_proj, which mixes embedding and hidden state.
        linear = sum(
            _attention_params(arch, hidden) + _mlp_params(arch, i) + 2 * hidden * hidden
            for i in mtp_layers
        )
        norms = 4 * hidden * len(mtp_layers)  # input/post-attention, embedding, hidden state
        return Footprint(linear, norms, len(mtp_layers))
    norms = (2 * layers + 1) * hidden
    if kind == "model":
        linear = sum(_attention_params(arch, hidden) + _mlp_params(arch, i) for i in range(layers))
        embeddings = arch.vocab_size * hidden * (1 if arch.tie_word_embeddings else 2)
        return Footprint(linear, embeddings + norms, layers)
    # EAGLE3's first layer attends over [embedding, fused hidden state]; its fc fuses three
    # target layers. EAGLE (v1) fuses embedding and one hidden state in fc instead.
    eagle3 = kind == "eagle3"
    first_input = 2 * hidden if eagle3 else hidden
    fc_input = 3 * (arch.target_hidden_size or hidden) if eagle3 else 2 * hidden
    linear = fc_input * hidden + sum(
        _attention_params(arch, first_input if i == 0 else hidden) + _mlp_params(arch, i)
        for i in range(layers)
    )
    lm_head = (arch.draft_vocab_size or arch.vocab_size) * hidden
    return Footprint(linear, lm_head + norms, layers)


def _weight_bits(
    profile: Profile, arch: ModelArch, quantization: str | None, dtype_bytes: int
) -> float:
    """Bits per decoder-layer weight: quantized, or the dtype vLLM loads."""
    method = quantization or arch.quant_method
    if method is None:
        return 8.0 * dtype_bytes
    if method not in _QUANT_BITS:
        raise ProfileError.at_key(
            profile.name,
            "engine.quantization",
            f"{method!r} is unknown to the memory estimate",
            f"use one of {', '.join(_QUANT_BITS)}, or teach bentospec/memory.py its size",
        )
    return float((arch.quantization_config or {}).get("bits") or _QUANT_BITS[method])


def _kv_cache_bytes(profile: Profile, dtype_bytes: int) -> int:
    kv_dtype = profile.engine.kv_cache_dtype
    if kv_dtype == "auto":
        return dtype_bytes
    if kv_dtype not in _KV_CACHE_BYTES:
        raise ProfileError.at_key(
            profile.name,
            "engine.kv_cache_dtype",
            f"{kv_dtype!r} is unknown to the memory estimate",
            f"use auto or one of {', '.join(_KV_CACHE_BYTES)}",
        )
    return _KV_CACHE_BYTES[kv_dtype]


def estimate(
    profile: Profile, target: ModelArch, draft: ModelArch | None, draft_kind: DraftKind | None
) -> MemoryEstimate:
    """Weights and KV bytes per token over all GPUs, sharding and replication included."""
    engine, spec = profile.engine, profile.speculative
    tp = engine.tensor_parallel_size
    # vLLM's dtype "auto" loads fp32 checkpoints as fp16, so only float32 (named, or chosen for
    # this CPU by engine_dtype) is 4 bytes.
    dtype_bytes = 4 if engine_dtype(profile) == "float32" else 2
    kv_bytes = _kv_cache_bytes(profile, dtype_bytes)

    def weights(arch: ModelArch, kind: DraftKind, quantization: str | None) -> float:
        fp = footprint(arch, kind)
        bits = _weight_bits(profile, arch, quantization, dtype_bytes)
        return fp.linear_params * bits / 8 + fp.other_params * dtype_bytes

    def kv_per_token(arch: ModelArch, kind: DraftKind, shards: int) -> float:
        # KV heads are split over the shards; with fewer heads than shards each holds a copy.
        kv_heads = math.ceil(arch.kv_heads / shards) * shards
        return 2 * footprint(arch, kind).kv_layers * kv_heads * arch.head_size * kv_bytes

    target_weights = weights(target, "model", engine.quantization)
    kv = kv_per_token(target, "model", tp)
    if draft is None or draft_kind is None or spec is None:
        return MemoryEstimate(target_weights, 0.0, kv)
    draft_tp = spec.draft_tensor_parallel_size or tp
    replicas = tp // draft_tp  # a draft on fewer GPUs than the target is copied to each
    # vLLM quantizes MTP layers like the target; other drafts load as their checkpoint is.
    draft_quantization = engine.quantization if draft_kind == "mtp" else None
    draft_weights = weights(draft, draft_kind, draft_quantization) * replicas
    kv += kv_per_token(draft, draft_kind, draft_tp) * replicas
    return MemoryEstimate(target_weights + draft_weights, draft_weights, kv)


def memory_summary(
    profile: Profile,
    target: ModelArch | None,
    draft: ModelArch | None,
    kind: DraftKind | None,
    notes: list[str],
) -> str:
    """Estimate memory; for GPU profiles fail unless one full-length sequence fits.

    A ``None`` model is of unknown size (the estimate is skipped); what else keeps the
    estimate from sizing the models is appended to ``notes``.
    """
    engine, spec = profile.engine, profile.speculative
    on_gpu = profile.hardware.accelerator == "cuda"
    skipped = "memory check skipped" if on_gpu else "CPU profile: GPU memory check skipped"
    if target is None or (spec is not None and spec.model is not None and draft is None):
        return skipped
    for key, arch in (("model.id", target), ("speculative.model", draft)):
        if arch is not None and (reason := arch.unsized_reason):
            notes.append(f"{key} KV cache not sized: {reason}")
            return skipped
    sizes = estimate(profile, target, draft, kind)
    head = f"weights {sizes.weight_bytes / _GIB:.1f} GiB"
    if sizes.draft_weight_bytes:
        head += f" (draft {sizes.draft_weight_bytes / _GIB:.1f} GiB)"
    head += f" + KV {sizes.kv_bytes_per_token / 1024:.0f} KiB/token"
    if on_gpu:
        kv_space, budget = _gpu_kv_space(profile, sizes, head)
    elif engine.kv_cache_memory_bytes is not None:
        kv_space, budget = float(engine.kv_cache_memory_bytes), skipped
    else:
        return f"{head}; {skipped}"
    tokens = int(kv_space // sizes.kv_bytes_per_token)
    sequences = tokens // engine.max_model_len
    line = (
        f"{head}: {kv_space / _GIB:.1f} GiB for KV = {_thousands(tokens)} tokens, "
        f"{sequences} sequences of {engine.max_model_len} ({budget})"
    )
    if on_gpu and sequences < 1:
        raise ProfileError.at_key(
            profile.name,
            "engine.max_model_len",
            f"{line}: not one full-length sequence fits",
            f"lower engine.max_model_len to <= {tokens}, or use more memory (see hardware)",
        )
    return line


def _gpu_kv_space(profile: Profile, sizes: MemoryEstimate, head: str) -> tuple[float, str]:
    """Bytes left for the KV cache on all GPUs, and how the budget was set; fail if none."""
    engine, hardware = profile.engine, profile.hardware
    assert hardware.gpu_memory_gib is not None  # HardwareSpec requires it for cuda
    gpus = engine.tensor_parallel_size
    memory = hardware.gpu_memory_gib * gpus * _GIB
    reserved = sizes.weight_bytes + RUNTIME_RESERVE_GIB * gpus * _GIB
    budget = f"{gpus}x{hardware.gpu_memory_gib:g} GiB"
    if engine.kv_cache_memory_bytes is not None:  # vLLM then ignores gpu_memory_utilization
        kv_space = float(engine.kv_cache_memory_bytes * gpus)
        fits = reserved + kv_space <= memory
        budget += ", kv_cache_memory_bytes"
    else:
        kv_space = memory * engine.gpu_memory_utilization - reserved
        fits = kv_space > 0
        budget += f" x {engine.gpu_memory_utilization:g}"
    budget += f", {RUNTIME_RESERVE_GIB:g} GiB/GPU reserve"
    if not fits:
        raise ProfileError.at_key(
            profile.name,
            "hardware.gpu_memory_gib",
            f"{head}: weights and KV cache do not fit ({budget})",
            "use more or larger GPUs (hardware.gpu_count and engine.tensor_parallel_size), "
            "engine.quantization: fp8, or a smaller model",
        )
    return kv_space, budget


def _thousands(tokens: int) -> str:
    return f"{tokens / 1000:.0f}k" if tokens >= 10_000 else str(tokens)
