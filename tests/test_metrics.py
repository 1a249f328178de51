"""Speculation math, request schemas and prompt rendering: pure functions, no engine."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bentospec.metrics import SpecCounters
from bentospec.prompts import PromptTemplates
from bentospec.schemas import GenerateRequest, OPEACompletionRequest

PROMETHEUS = """\
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 6.0
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 80.0
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 24.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
"""


def test_ratios_follow_vllm_definitions() -> None:
    c = SpecCounters(drafts=16, draft_tokens=80, accepted_tokens=24)
    assert c.acceptance_rate == pytest.approx(0.3)
    assert c.mean_acceptance_length == pytest.approx(1 + 24 / 16)
    assert SpecCounters().acceptance_rate is None
    assert SpecCounters().mean_acceptance_length is None


def test_prometheus_text_sums_label_sets() -> None:
    assert SpecCounters.from_prometheus_text(PROMETHEUS) == SpecCounters(
        drafts=16, draft_tokens=80, accepted_tokens=24
    )


def test_snapshot_difference_and_request_summary() -> None:
    later = SpecCounters(drafts=20, draft_tokens=100, accepted_tokens=30)
    earlier = SpecCounters(drafts=16, draft_tokens=80, accepted_tokens=24)
    assert later - earlier == SpecCounters(drafts=4, draft_tokens=20, accepted_tokens=6)
    summary = {"num_spec_steps": 4, "num_draft_tokens": 20, "num_accepted_draft_tokens": 6}
    assert SpecCounters.from_request(summary) == later - earlier


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "top_p": float("inf")}, "top_p"),
        ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
    ],
)
def test_generate_request_limits(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        GenerateRequest.model_validate(body)
    assert exc.value.errors()[0]["loc"][0] == field


def test_opea_request_has_opeas_defaults_and_reports_typical_p_as_ignored() -> None:
    req = OPEACompletionRequest(query="q", documents=["a", {"text": "b"}], max_new_tokens=7)
    assert req.document_texts() == ["a", "b"]
    options = req.sampling()
    assert (options.max_tokens, options.temperature, options.top_k) == (7, 0.01, 10)
    assert (options.top_p, options.repetition_penalty) == (0.95, 1.03)
    assert req.ignored_fields() == {}  # OPEA's default typical_p was not asked for
    assert set(OPEACompletionRequest(query="q", typical_p=0.95).ignored_fields()) == {"typical_p"}
    assert OPEACompletionRequest(query="q", typical_p=1.0).ignored_fields() == {}
    assert OPEACompletionRequest(query="q", max_tokens=9).sampling().max_tokens == 9
    both = OPEACompletionRequest(query="q", max_tokens=9, max_new_tokens=5)
    assert both.sampling().max_tokens == 5


def test_opea_chat_template_fills_question_and_context_once() -> None:
    template = "Context: {context}\nQ: {question} {unknown}"
    text = PromptTemplates().question("{context}?", ["doc {question}"], template)
    assert text == "Context: doc {question}\nQ: {context}? {unknown}"


def test_rag_template_lists_documents_then_question() -> None:
    text = PromptTemplates().question("What colour?", ["The sky is blue.", "Grass is green."])
    assert text.index("Document 1:") < text.index("The sky is blue.") < text.index("Document 2:")
    assert text.rstrip().endswith("Question: What colour?")
    assert PromptTemplates().question("Just this.", []) == "Just this."
