"""A benchmark run's report (``results.json``): what it recorded, with the figures and checks
derived from it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, computed_field

from bentospec.bench.checks import GreedyAgreement, greedy_agreement, token_problems
from bentospec.bench.figures import (
    ConfigStats,
    TargetCheck,
    ViaRatio,
    config_stats,
    target_checks,
    via_ratios,
)
from bentospec.bench.records import BenchRow, BenchSettings, Provenance


class BenchReport(BaseModel):
    settings: BenchSettings
    #: Ids of the prompt cases, in the order the requests cycle through them.
    prompt_ids: list[str]
    provenance: Provenance
    #: Resolved engine arguments (and environment) of each config, by label.
    configs: dict[str, dict[str, Any]]
    started_at: datetime
    finished_at: datetime
    rows: list[BenchRow]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def stats(self) -> list[ConfigStats]:
        return config_stats(self.rows)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ratios(self) -> list[ViaRatio]:
        return [
            *via_ratios(self.rows, "service", "vllm"),
            *via_ratios(self.rows, "service", "engine"),
        ]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def targets(self) -> list[TargetCheck]:
        return target_checks(self.stats, self.ratios, self.settings.categories)

    @property
    def dtypes(self) -> dict[str, str]:
        """The dtype each config's engine ran, by ``"label via via"``."""
        return {
            label: str(setup["engine_args"]["dtype"])
            for label, setup in self.configs.items()
            if "dtype" in setup.get("engine_args", {})
        }

    @computed_field  # type: ignore[prop-decorator]
    @property
    def problems(self) -> list[str]:
        return token_problems(self.rows, self.dtypes)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def agreement(self) -> list[GreedyAgreement]:
        return greedy_agreement(self.rows, self.dtypes)
