"""``bentospec step-costs``: the target's linear shapes, and one short real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bentospec.bench.step_cost import StepCostReport, linear_shapes
from bentospec.model_store import resolve_model
from bentospec.profile import load_profile
from tests.conftest import ROOT


def smollm2_config() -> dict:
    path = Path(resolve_model(load_profile("cpu").model.id)) / "config.json"
    return json.loads(path.read_text())


def test_linear_shapes_hold_the_targets_weights() -> None:
    config = smollm2_config()
    shapes = linear_shapes(config)
    assert len(shapes) == 4 * config["num_hidden_layers"] + 1
    assert shapes[-1] == (config["vocab_size"], config["hidden_size"])
    # SmolLM2-135M: 135M parameters, of which the norms are a few thousand.
    assert 134e6 < sum(n * k for n, k in shapes) < 136e6


@pytest.mark.engine
def test_step_costs_measure_plain_and_speculative_steps(tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "bentospec.cli", "step-costs", "--k", "3"),
        *("--batch", "1,2", "--max-tokens", "32", "--out", str(tmp_path)),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = StepCostReport.model_validate_json((tmp_path / "step-costs.json").read_text())
    assert [(s.k, s.batch) for s in report.steps] == [(0, 1), (0, 2), (3, 1), (3, 2)]
    plain, drafted = report.steps[0], report.steps[2]
    assert plain.tokens_per_step == 1
    # The repeated prompt gives ngram a draft at (almost) every step: up to 1 + 3 tokens.
    assert 2.5 < drafted.tokens_per_step <= 4
    assert all(s.step_ms > 0 for s in report.steps)
    assert {g.threads for g in report.gemm} == {1, 2}
    assert report.memory_bound_ms > 0 and report.dtype in ("float32", "bfloat16")
    assert "a plain step cannot take less than" in (tmp_path / "step-costs.md").read_text()
