"""Benchmark arithmetic: what one request measured, engine counters, percentiles, spreads."""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Sequence
from itertools import pairwise

from pydantic import BaseModel, ConfigDict

from bentospec.metrics import SpecCounters
from bentospec.vllm_api import GENERATION_TOKENS


class Counters(BaseModel):
    """The engine counters a level is checked against: generated tokens and spec-decode counts."""

    model_config = ConfigDict(frozen=True)

    generation_tokens: int = 0
    spec: SpecCounters = SpecCounters()

    def __sub__(self, earlier: Counters) -> Counters:
        return Counters(
            generation_tokens=self.generation_tokens - earlier.generation_tokens,
            spec=self.spec - earlier.spec,
        )

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[str, float]]) -> Counters:
        """From (metric name, value) samples, summed over label sets like ``SpecCounters``."""
        samples = list(samples)
        tokens = sum(v for n, v in samples if n.removesuffix("_total") == GENERATION_TOKENS)
        return cls(generation_tokens=int(tokens), spec=SpecCounters.from_samples(samples))


class RequestRecord(BaseModel):
    """One request as its client saw the response stream."""

    #: Index of the prompt it sent: requests with the same index are the same request.
    prompt: int
    #: Tokens generated, counted from the token ids in the response (EOS included).
    tokens: int
    #: A digest of the generated token ids: equal digests are equal outputs.
    digest: str
    #: The generated token ids: where two outputs part, when their digests differ.
    token_ids: list[int]
    ttft_s: float
    #: Per-token inter-token latencies after the first chunk: a chunk of n tokens after a gap g
    #: counts as n latencies of g/n, so a speculative step is not one slow "token".
    itl_s: list[float]


def token_digest(token_ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, token_ids)).encode()).hexdigest()[:12]


def record_from_chunks(
    prompt: int, start: float, chunks: Sequence[tuple[float, Sequence[int]]]
) -> RequestRecord:
    """A record from a stream's (arrival time, token ids carried) chunks; empty ones skipped."""
    chunks = [c for c in chunks if c[1]]
    if not chunks:
        raise ValueError("the stream carried no tokens")
    itl = [
        (arrival - previous) / len(ids)
        for (previous, _), (arrival, ids) in pairwise(chunks)
        for _ in ids
    ]
    ids = [token for _, chunk in chunks for token in chunk]
    return RequestRecord(
        prompt=prompt,
        tokens=len(ids),
        digest=token_digest(ids),
        token_ids=ids,
        ttft_s=chunks[0][0] - start,
        itl_s=itl,
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolated linearly between ranks as numpy does."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Spread(BaseModel):
    """The median of repeated measurements (rounds) and their range."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(
            median=statistics.median(values), low=min(values), high=max(values), n=len(values)
        )

    def text(self, fmt: str = ".2f", suffix: str = "") -> str:
        """``1.79x (1.71-1.85)``: the median, then the range when there is more than one value."""
        head = f"{self.median:{fmt}}{suffix}"
        return head if self.n == 1 else f"{head} ({self.low:{fmt}}-{self.high:{fmt}})"
