"""The memory estimate's parameter counts against the published sizes of the catalogue's models.

How the estimate turns into a profile's summary and failures: ``test_validation.py``.
"""

from __future__ import annotations

import pytest

from bentospec.memory import ModelArch, footprint
from bentospec.validation import MODEL_CONFIG_DIR


@pytest.mark.parametrize(
    ("config", "params", "tolerance"),
    [
        # Published parameter counts; Qwen3's q/k norms (2 x 128 per layer) are not counted.
        ("meta-llama__Llama-3.1-8B-Instruct", 8_030_261_248, 0),
        ("meta-llama__Llama-3.3-70B-Instruct", 70_553_706_496, 0),
        ("meta-llama__Llama-3.2-1B-Instruct", 1_235_814_400, 0),
        ("Qwen__Qwen3-8B", 8_190_735_360, 36 * 256),
        ("Qwen__Qwen3-0.6B", 596_049_920, 28 * 256),
    ],
)
def test_parameter_count_matches_published_size(config: str, params: int, tolerance: int) -> None:
    arch = ModelArch.model_validate_json((MODEL_CONFIG_DIR / f"{config}.json").read_text())
    fp = footprint(arch)
    assert abs(fp.linear_params + fp.other_params - params) <= tolerance


def test_moe_and_mtp_parameters() -> None:
    """GLM-4.5-Air: 106B without MTP; the checkpoint's 110B adds the MTP layer's own embedding
    and LM head copies, which vLLM shares with the target instead of loading twice."""
    arch = ModelArch.model_validate_json(
        (MODEL_CONFIG_DIR / "zai-org__GLM-4.5-Air.json").read_text()
    )
    model, mtp = footprint(arch), footprint(arch, "mtp")
    assert 106.8e9 < model.linear_params + model.other_params < 106.9e9
    mtp_with_copies = mtp.linear_params + mtp.other_params + 2 * arch.vocab_size * arch.hidden_size
    assert 110.4e9 < model.linear_params + model.other_params + mtp_with_copies < 110.5e9
    assert (model.kv_layers, mtp.kv_layers) == (46, 1)
