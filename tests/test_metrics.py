"""Speculation math, request schemas and prompt rendering: pure functions, no engine."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bentospec.engine_args import engine_kwargs
from bentospec.metrics import SpecCounters
from bentospec.profile import load_profile
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


def test_opea_request_maps_to_sampling_and_refuses_typical_p() -> None:
    req = OPEACompletionRequest(query="q", documents=["a", {"text": "b"}], max_new_tokens=7)
    assert req.document_texts() == ["a", "b"]
    assert req.sampling().max_tokens == 7 and req.sampling().temperature is None
    assert OPEACompletionRequest(query="q", typical_p=1.0).typical_p == 1.0
    with pytest.raises(ValidationError, match="typical-p"):
        OPEACompletionRequest(query="q", typical_p=0.95)


def test_rag_template_lists_documents_then_question() -> None:
    text = PromptTemplates().question("What colour?", ["The sky is blue.", "Grass is green."])
    assert text.index("Document 1:") < text.index("The sky is blue.") < text.index("Document 2:")
    assert text.rstrip().endswith("Question: What colour?")
    assert PromptTemplates().question("Just this.", []) == "Just this."


def test_cpu_speculation_is_greedy_only_and_defaults_openai_to_greedy() -> None:
    cpu, nospec = load_profile("cpu"), load_profile("cpu-nospec")
    assert cpu.greedy_only and not nospec.greedy_only
    assert engine_kwargs(cpu)["override_generation_config"] == {"temperature": 0.0}
    assert "override_generation_config" not in engine_kwargs(nospec)
    assert not load_profile("l4-24gb").greedy_only
