"""Request and response models of the service's own APIs (``/generate*`` and OPEA).

Limits that do not depend on the profile live here, so that BentoML/FastAPI answer 400 naming
the field before a request reaches the engine; profile-dependent limits (``max_model_len``)
are checked in :mod:`bentospec.generation`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Upper bounds that keep a single request from monopolising the engine.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_DOCUMENTS = 32
MAX_TEMPLATE_CHARS = 8192

TYPICAL_P_IGNORED = (
    "not applied: vLLM has no typical-p sampling, and custom logits processors are skipped "
    "under speculative decoding (use top_p / top_k / temperature)"
)

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

#: The Swagger UI's example bodies, which the README's first examples send too. Each gives the
#: model a document to copy from: ngram drafts only by copying n-grams already in the prompt or
#: the output, so a short open prompt gets few or none. Greedy (only temperature 0 is): left
#: out, the CPU profiles' 135M model samples at 1.0 and its answer reads as noise.
EXAMPLE_DOCUMENT = (
    "The Brewmaster 300 must be descaled every 60 days. To descale it, fill the water tank "
    "with one litre of descaling solution, run two hot water cycles, then rinse the tank and "
    "run two cycles with clean water."
)
GENERATE_EXAMPLE: dict[str, Any] = {
    # A raw prompt: the answer's first words lead the model into the document's.
    "prompt": f"{EXAMPLE_DOCUMENT}\n\nQuestion: How do I descale the Brewmaster 300?\n"
    "Answer: To descale the Brewmaster 300,",
    "max_tokens": 64,
    "temperature": 0,
}
OPEA_EXAMPLE: dict[str, Any] = {
    "query": "How often must it be descaled?",
    "documents": [EXAMPLE_DOCUMENT],
    "max_new_tokens": 64,
    "temperature": 0,
    "streaming": False,
}


class SamplingOptions(BaseModel):
    """Sampling parameters shared by every API; defaults are vLLM's.

    ``temperature`` left out takes the model's generation config, else 1.0, as in ``vllm serve``.
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
    #: ``"off"``: no draft tokens for this request (profiles with method ``adaptive-ngram``,
    #: whose proposer reads it per request; other speculative profiles answer 400).
    speculation: Literal["auto", "off"] = "auto"


class GenerateRequest(SamplingOptions):
    """Body of ``/generate`` (streams text) and ``/generate_full`` (returns JSON)."""

    model_config = ConfigDict(json_schema_extra={"example": GENERATE_EXAMPLE})

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
    #: Decoding steps that verified drafts, and steps that did not (no n-gram match, or the
    #: ``adaptive-ngram`` proposer chose k=0 for this request).
    steps_with_drafts: int | None = None
    steps_without_drafts: int | None = None
    #: ``adaptive-ngram``: draft tokens verified at each step that carried drafts, in order
    #: (the k the proposer chose over time, shortened where the n-gram match was shorter);
    #: empty for other methods. A list, not ``None``: BentoML's clients cannot decode a null
    #: array.
    drafts_per_step: list[int] = []


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
    """OPEA GenAIComps ``LLMParamsDoc``: the fields and defaults of OPEA's LLM microservice.

    Every field is honoured except ``typical_p``: vLLM has no typical-p sampling, and a custom
    logits processor would be skipped on the speculative path, so it is accepted and reported
    in ``ignored_fields`` (and the log) when sent with a value other than 1.0, the way
    ``vllm serve`` treats fields it ignores. Unknown fields are refused with a 400.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": OPEA_EXAMPLE})

    #: The served model's name (OPEA sends it for OpenAI-style backends); others get 404.
    model: str | None = None
    query: Annotated[str, Field(min_length=1)]
    documents: Annotated[list[str | OPEADocument], Field(max_length=MAX_DOCUMENTS)] = []
    max_new_tokens: Annotated[int, Field(ge=1)] = 1024
    #: OPEA's alias of ``max_new_tokens`` for OpenAI-style backends; used when that is unset.
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] = 10
    top_p: Annotated[FiniteFloat, Field(gt=0, le=1)] = 0.95
    typical_p: Annotated[FiniteFloat, Field(gt=0, le=1)] = 0.95
    temperature: Annotated[FiniteFloat, Field(ge=0, le=2)] = 0.01
    frequency_penalty: Annotated[FiniteFloat, Field(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[FiniteFloat, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[FiniteFloat, Field(gt=0, le=2)] = 1.03
    streaming: bool = True
    #: OPEA passes it through to OpenAI-style backends; the final SSE event always has usage.
    stream_options: dict[str, bool] | None = None
    #: OPEA's prompt template with ``{question}`` and optionally ``{context}`` (the documents);
    #: replaces ``prompts/rag.jinja`` / ``plain.jinja`` for this request.
    chat_template: Annotated[str, Field(min_length=1, max_length=MAX_TEMPLATE_CHARS)] | None = None
    #: As ``SamplingOptions.speculation`` (a bentospec extension of OPEA's request).
    speculation: Literal["auto", "off"] = "auto"

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def ignored_fields(self) -> dict[str, str]:
        """Fields the client set that this service cannot apply, with the reason."""
        if "typical_p" in self.model_fields_set and self.typical_p != 1.0:
            return {"typical_p": TYPICAL_P_IGNORED}
        return {}

    def sampling(self) -> SamplingOptions:
        max_tokens = self.max_new_tokens
        if "max_new_tokens" not in self.model_fields_set and self.max_tokens is not None:
            max_tokens = self.max_tokens
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            speculation=self.speculation,
        )


class HealthStatus(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    engine: str
    profile: str
