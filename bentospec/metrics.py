"""Speculative-decoding figures: counters from vLLM and the ratios derived from them.

Acceptance rate = accepted / drafted tokens; mean acceptance length = 1 + accepted / drafts
(tokens emitted per verification step, the bonus token included), as vLLM defines them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

#: vLLM's Prometheus counter names (without the ``_total`` suffix).
DRAFTS = "vllm:spec_decode_num_drafts"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"


class SpecCounters(BaseModel):
    """Spec-decode counters over some span: one request, or the engine since a snapshot."""

    model_config = ConfigDict(frozen=True)

    #: Verification steps that carried draft tokens.
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    def __sub__(self, earlier: SpecCounters) -> SpecCounters:
        return SpecCounters(
            drafts=self.drafts - earlier.drafts,
            draft_tokens=self.draft_tokens - earlier.draft_tokens,
            accepted_tokens=self.accepted_tokens - earlier.accepted_tokens,
        )

    @classmethod
    def from_request(cls, summary: Mapping[str, Any]) -> SpecCounters:
        """From vLLM's per-request ``RequestSpecDecodeMetrics.to_dict()``."""
        return cls(
            drafts=summary.get("num_spec_steps", 0),
            draft_tokens=summary.get("num_draft_tokens", 0),
            accepted_tokens=summary.get("num_accepted_draft_tokens", 0),
        )

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[str, float]]) -> SpecCounters:
        """From (metric name, value) samples, summed over label sets (engines, models)."""
        totals = {DRAFTS: 0.0, DRAFT_TOKENS: 0.0, ACCEPTED_TOKENS: 0.0}
        for name, value in samples:
            key = name.removesuffix("_total")
            if key in totals:
                totals[key] += value
        return cls(
            drafts=int(totals[DRAFTS]),
            draft_tokens=int(totals[DRAFT_TOKENS]),
            accepted_tokens=int(totals[ACCEPTED_TOKENS]),
        )

    @classmethod
    def from_prometheus_text(cls, text: str) -> SpecCounters:
        """From a Prometheus text exposition (a service's ``/metrics``)."""
        from prometheus_client.parser import text_string_to_metric_families

        return cls.from_samples(
            (sample.name, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        )


class SpecGauges:
    """Acceptance rate and mean acceptance length as Prometheus gauges, from vLLM's counters.

    The gauges are not registered in a registry: under BentoML's multiprocess metrics, the
    values' files are what ``/metrics`` reads, and an unregistered gauge can be created once
    per service instance without clashing with another instance in the same process.
    """

    def __init__(self, model_name: str) -> None:
        self._rate = self._gauge(
            "bentospec_spec_decode_acceptance_rate",
            "Accepted / drafted speculative tokens since the engine started.",
            model_name,
        )
        self._length = self._gauge(
            "bentospec_spec_decode_mean_acceptance_length",
            "Tokens emitted per verification step (1 + accepted / drafts) since start.",
            model_name,
        )

    @staticmethod
    def _gauge(name: str, documentation: str, model_name: str) -> Any:
        from prometheus_client import Gauge

        return Gauge(
            name,
            documentation,
            labelnames=["model_name"],
            registry=None,
            multiprocess_mode="livemostrecent",
        ).labels(model_name=model_name)

    def refresh(self, counters: SpecCounters) -> None:
        if counters.acceptance_rate is not None:
            self._rate.set(counters.acceptance_rate)
        if counters.mean_acceptance_length is not None:
            self._length.set(counters.mean_acceptance_length)


def engine_counters() -> SpecCounters:
    """This process's vLLM spec-decode counters (the engine's front end records them here)."""
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    return SpecCounters.from_samples(
        (m.name, m.value) for m in get_metrics_snapshot() if isinstance(m, Counter)
    )
