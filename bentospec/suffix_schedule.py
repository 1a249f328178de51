"""vLLM plugin: suffix decoding follows a batch-size schedule (k by batch size, down to 0).

With a schedule, vLLM 0.32's scheduler picks each step's draft length from the batch size and
the model runner passes it to the proposer, but ``SuffixDecodingProposer.propose`` asserts that
it is the configured maximum: the first step below the maximum kills the engine core. vLLM's
main still asserts it. Here ``propose`` speculates at most the scheduled number of tokens for the
step, down to none, while it still appends every sampled token to the request's suffix tree, so
the tree stays whole when the batch shrinks again. Installed where the assertion reproduces;
delete this module when vLLM's proposer takes the scheduled length.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any

#: The entry-point name in ``pyproject.toml``.
PLUGIN_NAME = "bentospec_suffix_schedule"

logger = logging.getLogger(f"vllm.plugins.{PLUGIN_NAME}")


def refuses_shorter_steps(proposer_class: type) -> bool:
    """True if ``proposer_class().propose`` refuses a step's k below the configured one."""
    proposer = proposer_class.__new__(proposer_class)
    proposer.num_speculative_tokens = 2
    proposer.suffix_cache = SimpleNamespace(active_requests=set())
    empty_batch = SimpleNamespace(req_ids=[], req_id_to_index={})
    try:
        proposer.propose(1, empty_batch, [])
    except AssertionError:
        return True
    return False


def following_schedule(propose: Any) -> Any:
    """``propose`` whose drafts are at most the step's scheduled length."""

    @functools.wraps(propose)
    def propose_scheduled(self: Any, num_speculative_tokens: int, *args: Any, **kwargs: Any) -> Any:
        configured = self.num_speculative_tokens
        # vLLM's proposer caps each draft at its own attribute: the step's length for one call.
        self.num_speculative_tokens = min(num_speculative_tokens, configured)
        try:
            return propose(self, self.num_speculative_tokens, *args, **kwargs)
        finally:
            self.num_speculative_tokens = configured

    propose_scheduled.bentospec_scheduled = True  # type: ignore[attr-defined]
    return propose_scheduled


def register() -> None:
    """``vllm.general_plugins`` entry point: suffix drafts follow the scheduled k."""
    from bentospec import vllm_api

    proposer = vllm_api.suffix_proposer_class()
    if getattr(proposer.propose, "bentospec_scheduled", False):
        return  # registered already in this process
    try:
        broken = refuses_shorter_steps(proposer)
    except Exception as exc:  # a proposer this check does not know: cap it all the same
        logger.warning("vLLM's suffix proposer fails its check (%s): capping it", exc)
        broken = True
    if not broken:
        logger.info("vLLM's suffix proposer takes the scheduled k: %s leaves it", PLUGIN_NAME)
        return
    proposer.propose = following_schedule(proposer.propose)
    logger.info("%s: suffix drafts follow the batch-size schedule", PLUGIN_NAME)
