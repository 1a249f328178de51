"""The checks that make a benchmark run trustworthy, or say why it is not.

Every level's token count from the responses must equal the engine's counter. Greedy configs
must generate the same outputs for the same requests where they ran float32; in bf16 a row's
logits depend on the rows batched with it, so there outputs are compared and the agreement is
reported (identical outputs, where they first part) instead of failing the run.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from bentospec.bench.records import BenchRow


#: The dtype whose greedy outputs must not depend on how a step batches its rows. In bf16
#: (and float16) a row's logits change with the rows next to it (batch size, verified drafts),
#: so speculation may flip a near-tie: outputs are compared and reported, not failed.
EXACT_DTYPE = "float32"


class GreedyAgreement(BaseModel):
    """How far one config's greedy outputs follow the baseline's, request by request."""

    config: str
    concurrency: int
    round: int
    #: Requests whose output equals the baseline's for the same prompt.
    identical: int
    requests: int
    #: Median token position where the differing outputs part (``None``: none differ).
    first_divergence_p50: float | None


def greedy_groups(rows: Sequence[BenchRow]) -> dict[tuple[str, int, int], list[BenchRow]]:
    """Greedy rows that ran the same requests: by model, concurrency and round."""
    groups: dict[tuple[str, int, int], list[BenchRow]] = defaultdict(list)
    for r in rows:
        if r.workload == "greedy":
            groups[(r.model, r.concurrency, r.round)].append(r)
    return groups


def token_problems(rows: Sequence[BenchRow], dtypes: Mapping[str, str] | None = None) -> list[str]:
    """What makes the run untrustworthy: response counts that disagree with the engine's
    counter, and greedy configs in float32 that generated different token totals for the same
    requests. ``dtypes`` maps ``"label via via"`` to the dtype its engine ran; a group with any
    other dtype is reported by :func:`greedy_agreement` instead."""
    problems = [
        f"{r.key}, {r.workload}, concurrency {r.concurrency}, round {r.round}: "
        f"responses carried {r.output_tokens} tokens, the engine counted {r.counter_tokens}"
        for r in rows
        if r.counter_tokens != r.output_tokens
    ]
    for (_, level, rnd), group in greedy_groups(rows).items():
        if not _exact(group, dtypes):
            continue
        totals = {r.key: r.output_tokens for r in group}
        if len(set(totals.values())) > 1:
            differing = _differing_prompts(group)
            problems.append(
                f"greedy, concurrency {level}, round {rnd}: the same requests generated "
                f"different token totals {totals} (prompts that differ: {differing})"
            )
    return problems


def _exact(group: Sequence[BenchRow], dtypes: Mapping[str, str] | None) -> bool:
    """Whether every config of ``group`` ran float32 (unknown dtypes count as float32)."""
    return all((dtypes or {}).get(r.key, EXACT_DTYPE) == EXACT_DTYPE for r in group)


def greedy_agreement(
    rows: Sequence[BenchRow], dtypes: Mapping[str, str] | None = None
) -> list[GreedyAgreement]:
    """For groups not in float32: each speculative config's outputs against the same round's
    no-speculation baseline, prompt by prompt."""
    found = []
    for (_, level, rnd), group in greedy_groups(rows).items():
        baseline = next((r for r in group if r.speculative is None), None)
        if baseline is None or _exact(group, dtypes):
            continue
        expected = {q.prompt: q.token_ids for q in baseline.requests}
        for row in group:
            if row is baseline or row.speculative is None:
                continue
            parts = [
                _first_difference(expected[q.prompt], q.token_ids)
                for q in row.requests
                if q.prompt in expected
            ]
            differing = [p for p in parts if p is not None]
            found.append(
                GreedyAgreement(
                    config=row.key,
                    concurrency=level,
                    round=rnd,
                    identical=len(parts) - len(differing),
                    requests=len(parts),
                    first_divergence_p50=statistics.median(differing) if differing else None,
                )
            )
    return found


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where ``a`` and ``b`` differ (a length counts); ``None`` if equal."""
    if list(a) == list(b):
        return None
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _differing_prompts(group: Sequence[BenchRow]) -> list[int]:
    outputs: dict[int, set[str]] = defaultdict(set)
    for row in group:
        for request in row.requests:
            outputs[request.prompt].add(request.digest)
    return sorted(p for p, digests in outputs.items() if len(digests) > 1)
