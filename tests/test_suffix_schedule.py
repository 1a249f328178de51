"""The vLLM plugin that lets suffix decoding follow a batch-size schedule: the bug it works
around, its wrapper over vLLM's own proposer, and a real engine with a schedule."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest

from bentospec import vllm_api
from bentospec.dataset import load_cases
from bentospec.profile import load_profile
from bentospec.suffix_schedule import PLUGIN_NAME, following_schedule, refuses_shorter_steps
from tests.conftest import LoopThread, greedy_answer

pytest.importorskip("arctic_inference")

#: A prompt that repeats itself, so the tree has a long continuation to draft from.
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14] * 3


def vllm_proposer() -> type:
    """vLLM's class with vLLM's own ``propose`` (an engine in this process may have loaded the
    plugin already)."""
    proposer = vllm_api.suffix_proposer_class()
    propose = proposer.propose
    return type("Proposer", (proposer,), {"propose": getattr(propose, "__wrapped__", propose)})


def proposer_with_tree(k: int) -> object:
    """vLLM's proposer built by its own ``__init__`` over a real suffix tree (vLLM's defaults,
    no global tree), from the config fields it reads."""
    speculative = SimpleNamespace(
        num_speculative_tokens=k,
        suffix_decoding_max_tree_depth=24,
        suffix_decoding_max_cached_requests=0,
        suffix_decoding_max_spec_factor=1.0,
        suffix_decoding_min_token_prob=0.1,
    )
    config = SimpleNamespace(
        speculative_config=speculative, model_config=SimpleNamespace(max_model_len=4096)
    )
    return vllm_proposer()(config)


class OneRequestBatch:
    """The fields of vLLM's ``InputBatch`` the proposer reads, for one request."""

    def __init__(self, tokens: list[int]) -> None:
        self.req_ids = ["r"]
        self.req_id_to_index = {"r": 0}
        self.num_prompt_tokens = np.array([len(PROMPT)])
        self.token_ids_cpu = np.zeros((1, 4096), dtype=np.int32)
        self.num_tokens_no_spec = np.array([0])
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        start = int(self.num_tokens_no_spec[0])
        self.token_ids_cpu[0, start : start + len(tokens)] = tokens
        self.num_tokens_no_spec = np.array([start + len(tokens)])


def test_the_plugin_is_a_vllm_general_plugin() -> None:
    assert PLUGIN_NAME in {ep.name for ep in entry_points(group="vllm.general_plugins")}


def test_vllms_suffix_proposer_refuses_a_scheduled_k_below_its_maximum() -> None:
    """The bug: when this fails, vLLM takes the scheduled k and the plugin can go."""
    proposer = vllm_proposer()
    assert refuses_shorter_steps(proposer)
    fixed = type("Fixed", (proposer,), {"propose": following_schedule(proposer.propose)})
    assert not refuses_shorter_steps(fixed)


@pytest.mark.parametrize("scheduled", [0, 1, 3, 8])
def test_drafts_follow_the_scheduled_k_and_the_tree_keeps_every_token(scheduled: int) -> None:
    proposer = proposer_with_tree(8)
    propose = following_schedule(type(proposer).propose)
    sampled = [5]  # the prompt's first token again: the rest of the prompt is the match
    batch = OneRequestBatch([*PROMPT, *sampled])
    (draft,) = propose(proposer, scheduled, batch, [sampled])
    assert draft == PROMPT[1 : 1 + scheduled]
    assert proposer.num_speculative_tokens == 8
    # A step skipped by the schedule still appended its token: the next one drafts after it.
    batch.extend([6])
    (draft,) = propose(proposer, 8, batch, [[6]])
    assert draft == PROMPT[2:10]


@pytest.mark.engine
def test_an_engine_with_a_suffix_schedule_drafts_at_most_the_scheduled_k(
    loop: LoopThread,
) -> None:
    """Float32 greedy, k=2 at every batch size below the profile's 8: without the plugin the
    engine core dies at its first speculative step."""
    cpu_suffix = load_profile("cpu-suffix").with_engine(dtype="float32")
    spec = cpu_suffix.speculative
    assert spec is not None
    scheduled = cpu_suffix.with_speculative(
        spec.model_copy(update={"num_speculative_tokens_per_batch_size": ((1, 16, 2),)})
    )
    (case,) = load_cases(None, {"rag"}, 1)
    result = greedy_answer(loop, scheduled, case)
    plain = greedy_answer(loop, load_profile("cpu-nospec").with_engine(dtype="float32"), case)
    stats = result.speculation
    assert stats.accepted_tokens > 0 and stats.steps_with_drafts
    assert stats.draft_tokens <= 2 * stats.steps_with_drafts
    assert result.text == plain.text
