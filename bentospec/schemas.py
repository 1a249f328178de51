"""Request and response models of the service's own APIs (``/generate*`` and OPEA).

Limits that do not depend on the profile live here, so that BentoML/FastAPI answer 400 naming
the field before a request reaches the engine; profile-dependent limits (``max_model_len``)
are checked in :mod:`bentospec.generation`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Upper bounds that keep a single request from monopolising the engine.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_DOCUMENTS = 32

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class SamplingOptions(BaseModel):
    """Sampling parameters shared by every API; defaults are vLLM's except ``temperature``.

    ``temperature`` left out means the profile's default: greedy (0) where speculation is
    only exact for greedy requests (CPU profiles, see ``Profile.greedy_only``), else 1.0.
    """

    model_config = ConfigDict(extra="forbid")

    max_tokens: Annotated[int, Field(ge=1, description="Tokens to generate at most.")] = 256
    temperature: Annotated[FiniteFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[FiniteFloat, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1, description="0 or -1 disables top-k.")] = 0
    min_p: Annotated[FiniteFloat, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[FiniteFloat, Field(gt=0, le=2)] = 1.0
    presence_penalty: Annotated[FiniteFloat, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[FiniteFloat, Field(ge=-2, le=2)] = 0.0
    stop: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
        Field(max_length=MAX_STOP_SEQUENCES),
    ] = []
    #: vLLM seeds are 64-bit; larger values overflow inside the engine.
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None


class GenerateRequest(SamplingOptions):
    """Body of ``/generate`` (streams text) and ``/generate_full`` (returns JSON)."""

    prompt: Annotated[str, Field(min_length=1, description="Raw prompt text (no chat template).")]


class SpeculationStats(BaseModel):
    """What speculation did for one request."""

    method: str | None
    #: False when the profile has no speculation or the engine proposed no draft tokens.
    applied: bool
    #: Why speculation did not run, when it did not.
    reason: str | None = None
    draft_tokens: int = 0
    accepted_tokens: int = 0
    #: accepted / draft tokens.
    acceptance_rate: float | None = None
    #: Tokens emitted per verification step (1 + accepted / steps).
    mean_acceptance_length: float | None = None


class GenerateResult(BaseModel):
    """Body returned by ``/generate_full``."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    speculation: SpeculationStats


class OPEADocument(BaseModel):
    text: str


class OPEACompletionRequest(BaseModel):
    """OPEA GenAIComps ``spec_decode`` request (``LLMParamsDoc``), with every field honoured.

    vLLM has no typical-p sampling, so ``typical_p`` is accepted only at its neutral value.
    """

    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, Field(min_length=1)]
    documents: Annotated[list[str | OPEADocument], Field(max_length=MAX_DOCUMENTS)] = []
    max_new_tokens: Annotated[int, Field(ge=1)] = 1024
    top_k: Annotated[int, Field(ge=-1)] = 10
    top_p: Annotated[FiniteFloat, Field(gt=0, le=1)] = 0.95
    typical_p: FiniteFloat | None = None
    #: OPEA defaults to 0.01; here the profile's default (see ``SamplingOptions``).
    temperature: Annotated[FiniteFloat, Field(ge=0, le=2)] | None = None
    repetition_penalty: Annotated[FiniteFloat, Field(gt=0, le=2)] = 1.0
    streaming: bool = True

    @field_validator("typical_p")
    @classmethod
    def _typical_p_is_neutral(cls, value: float | None) -> float | None:
        if value is not None and value != 1.0:
            raise ValueError(
                "vLLM does not implement typical-p sampling; send 1.0 or leave typical_p out "
                "(use top_p / top_k / temperature instead)"
            )
        return value

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )


class HealthStatus(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    engine: str
    profile: str
