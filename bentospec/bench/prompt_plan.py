"""Which prompt each request of a run carries: what keeps a figure from measuring memory.

A server can remember what it has served: vLLM's prefix cache keeps the KV of prompts it has
seen, and ``suffix`` with a global tree (``suffix_decoding_max_cached_requests`` > 0) drafts from
earlier answers, so a prompt sent twice comes back faster the second time. Two reuse modes:

- ``unseen`` (the default): every server gets each prompt at most once in its life. The warm-up
  takes prompts no level measures; each level (per workload) takes prompts no other level of
  that server had. A server started for one round takes the same prompts as the servers of the
  other rounds (they are fresh); servers that outlive rounds (``--servers``, ``--url``) take new
  prompts every round. It needs a large pool (``bentospec/data/pool-*.jsonl``).
- ``repeated``: every level cycles through the same prompts, the warm-up too. This is the
  "repeated documents" workload, where remembering is the point (RAG over a fixed corpus, an
  agent re-reading its transcript); it is reported as such, never as a headline figure.

Every config of a run gets the same plan, so that speedups pair the same prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import count
from typing import Literal

from pydantic import BaseModel

PromptReuse = Literal["unseen", "repeated"]

#: ``unseen``: the fewest requests a level sends, so that a c1 median is not of 4 requests.
UNSEEN_LEVEL_MIN = 12


class PromptPoolTooSmall(ValueError):
    """The dataset has fewer distinct prompts than an ``unseen`` run needs."""


class PromptPlan(BaseModel):
    """Prompt indices (into the run's prompt list) per warm-up and per level."""

    warm_up: list[int]
    #: ``(round, workload, concurrency)`` -> the prompt of each request, in sending order.
    levels: dict[tuple[int, str, int], list[int]]

    def level(self, round_: int, workload: str, concurrency: int) -> list[int]:
        return self.levels[round_, workload, concurrency]


def requests_per_level(prompts: int, concurrency: int, per_slot: int) -> int:
    """``repeated``: every prompt once, and at least ``per_slot`` requests per slot: a level
    of one request per slot would be all ramp-up and tail, never a steady batch."""
    return max(prompts, per_slot * concurrency)


def unseen_level_size(concurrency: int, per_slot: int) -> int:
    """``unseen``: ``per_slot`` new prompts per slot, at least :data:`UNSEEN_LEVEL_MIN`."""
    return max(UNSEEN_LEVEL_MIN, per_slot * concurrency)


def plan_prompts(
    prompts: int,
    concurrency: Sequence[int],
    workloads: Sequence[str],
    rounds: int,
    per_slot: int,
    reuse: PromptReuse,
    outlive_rounds: bool,
) -> PromptPlan:
    """The plan of a run; ``outlive_rounds``: its servers stay up from round to round.

    Raises:
        PromptPoolTooSmall: ``unseen`` needs more distinct prompts than ``prompts``.
    """
    top = max(concurrency)
    if reuse == "repeated":
        cycle = {
            c: [i % prompts for i in range(requests_per_level(prompts, c, per_slot))]
            for c in concurrency
        }
        return PromptPlan(
            warm_up=list(range(min(prompts, top))),
            levels={
                (r, w, c): cycle[c]
                for r in range(1, rounds + 1)
                for w in workloads
                for c in concurrency
            },
        )
    fresh = count()
    warm_up = [next(fresh) for _ in range(top)]
    levels: dict[tuple[int, str, int], list[int]] = {}
    for r in range(1, rounds + 1):
        for w in workloads:
            for c in concurrency:
                levels[r, w, c] = (
                    [next(fresh) for _ in range(unseen_level_size(c, per_slot))]
                    if outlive_rounds or r == 1
                    else levels[1, w, c]
                )
    needed = next(fresh)
    if needed > prompts:
        fixes = "a larger --prompts file (bentospec/data/pool-*.jsonl), fewer levels, fewer "
        fixes += "--requests-per-slot"
        if outlive_rounds:
            fixes += ", --restart-servers (fresh servers per round reuse one round's prompts)"
        raise PromptPoolTooSmall(
            f"--prompt-reuse unseen sends a server each prompt at most once: this run needs "
            f"{needed} distinct prompts, the selection has {prompts}; use {fixes}, or measure "
            "repeated documents with --prompt-reuse repeated"
        )
    return PromptPlan(warm_up=warm_up, levels=levels)
