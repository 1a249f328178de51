"""Speculative-decoding figures: counters from vLLM and the ratios derived from them.

Acceptance rate = accepted / drafted tokens; mean acceptance length = 1 + accepted / drafts
(tokens emitted per verification step, the bonus token included), as vLLM defines them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from bentospec import vllm_api
from bentospec.vllm_api import ACCEPTED_TOKENS, DRAFT_TOKENS, DRAFTS

if TYPE_CHECKING:
    from bentospec.profile import Profile


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
            drafts=summary.get(vllm_api.REQUEST_SPEC_STEPS, 0),
            draft_tokens=summary.get(vllm_api.REQUEST_DRAFT_TOKENS, 0),
            accepted_tokens=summary.get(vllm_api.REQUEST_ACCEPTED_TOKENS, 0),
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
        return cls.from_samples(prometheus_samples(text))


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
        return live_gauge(name, documentation, model_name=model_name)

    def refresh(self, counters: SpecCounters) -> None:
        if counters.acceptance_rate is not None:
            self._rate.set(counters.acceptance_rate)
        if counters.mean_acceptance_length is not None:
            self._length.set(counters.mean_acceptance_length)


class StatusGauges:
    """Which profile serves which model, and whether its engine is ready, on ``/metrics``.

    ``bentospec_profile_info`` is an info-style gauge (always 1): dashboards and alerts read
    the profile from its labels and join on ``model_name``, vLLM's own label.
    ``bentospec_engine_ready`` is 0 until the engine has loaded, and again while a new engine
    replaces one that died (``watchdog``).
    """

    def __init__(self, profile: Profile) -> None:
        spec = profile.speculative
        live_gauge(
            "bentospec_profile_info",
            "The profile this service runs (always 1; the labels carry the information).",
            profile=profile.name,
            model_name=profile.served_model_name,
            method=spec.method if spec is not None else "none",
            accelerator=profile.hardware.accelerator,
        ).set(1)
        self._ready = live_gauge(
            "bentospec_engine_ready",
            "1 once the engine is loaded and serving, 0 while it loads or after it failed.",
            model_name=profile.served_model_name,
        )
        self._ready.set(0)

    def set_ready(self, ready: bool) -> None:
        self._ready.set(1 if ready else 0)


def live_gauge(name: str, documentation: str, **labels: str) -> Any:
    """An unregistered gauge child with ``labels`` set (see :class:`SpecGauges` for why)."""
    from prometheus_client import Gauge

    return Gauge(
        name,
        documentation,
        labelnames=list(labels),
        registry=None,
        multiprocess_mode="livemostrecent",
    ).labels(**labels)


def engine_counters() -> SpecCounters:
    """This process's vLLM spec-decode counters (the engine's front end records them here)."""
    return SpecCounters.from_samples(engine_samples())


def prometheus_samples(text: str) -> list[tuple[str, float]]:
    """(metric name, value) of every sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (sample.name, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def engine_samples() -> list[tuple[str, float]]:
    """(metric name, value) of this process's vLLM counters (an in-process engine's)."""
    return vllm_api.counter_samples()
