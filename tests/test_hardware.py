"""Hardware auto-detection picks the right catalogue profile; an explicit choice always wins."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bentospec import hardware
from bentospec.hardware import GPU, Hardware, best_profile, select_profile
from bentospec.profile import ProfileError, list_profiles
from tests.conftest import CATALOGUE_DIR, catalogue

# Names and sizes as NVML reports them (MiB / 1024): an "80 GB" H100 has 79.6 GiB.
L4 = GPU(name="NVIDIA L4", memory_gib=23034 / 1024)
A100_80GB = GPU(name="NVIDIA A100-SXM4-80GB", memory_gib=81920 / 1024)
A100_40GB = GPU(name="NVIDIA A100-SXM4-40GB", memory_gib=40960 / 1024)
H100 = GPU(name="NVIDIA H100 80GB HBM3", memory_gib=81559 / 1024)

#: The real probe, kept before the autouse fixture replaces it.
DETECT = hardware.detect

CATALOGUE = catalogue()


@pytest.fixture(autouse=True)
def catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's catalogue, no profile forced, and no real GPU probing."""
    monkeypatch.setenv("BENTOSPEC_CONFIG_DIR", str(CATALOGUE_DIR))
    monkeypatch.delenv("BENTOSPEC_PROFILE", raising=False)
    monkeypatch.setattr(hardware, "detect", _fail_if_probed)


def _fail_if_probed() -> Hardware:
    raise AssertionError("select_profile probed the GPUs although a profile was chosen")


def _machine(monkeypatch: pytest.MonkeyPatch, *gpus: GPU) -> None:
    monkeypatch.setattr(hardware, "detect", lambda: Hardware(gpus=gpus))


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ((), "cpu"),
        ((L4,), "l4-24gb"),
        ((L4, L4), "l4-24gb"),
        ((A100_80GB,), "a100-80gb"),
        # No profile is written for 40 GB; the 80 GB one would not fit its memory.
        ((A100_40GB,), "cpu"),
        ((H100,), "h100-80gb"),
        ((H100,) * 2, "h100x2"),
        ((H100,) * 4, "h100x4"),
        # No 8-GPU profile: the largest that fits.
        ((H100,) * 8, "h100x4"),
    ],
    ids=lambda value: Hardware(gpus=value).describe() if isinstance(value, tuple) else value,
)
def test_best_profile(gpus: tuple[GPU, ...], expected: str) -> None:
    assert best_profile(CATALOGUE, Hardware(gpus=gpus)).name == expected


def test_auto_detection_uses_the_detected_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, *(H100,) * 4)
    assert select_profile().name == "h100x4"


def test_explicit_profile_wins_over_environment_and_hardware(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BENTOSPEC_PROFILE", "h100x2")
    assert select_profile("cpu-draft").name == "cpu-draft"


def test_environment_wins_over_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENTOSPEC_PROFILE", "l4-24gb-rag")
    assert select_profile().name == "l4-24gb-rag"


def test_unknown_profile_is_refused_listing_the_valid_ones() -> None:
    with pytest.raises(ProfileError, match="unknown profile 'h200'") as caught:
        select_profile("h200")
    assert ", ".join(list_profiles()) in str(caught.value)


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "cpu/../cpu",
        "../configs/cpu",
        "/etc/passwd",
        str(CATALOGUE_DIR / "cpu.yaml"),
        str(CATALOGUE_DIR / "cpu"),
        "cpu.yaml",
        "./cpu",
        "..",
        "~/cpu",
        "CPU",
        # "$" in the name pattern matches before a trailing newline; the catalogue lookup does not.
        "cpu\n",
    ],
)
def test_path_like_names_are_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    with pytest.raises(ProfileError, match="unknown profile"):
        select_profile(name)
    monkeypatch.setenv("BENTOSPEC_PROFILE", name)
    with pytest.raises(ProfileError, match="unknown profile"):
        select_profile()


def test_invalid_profile_is_skipped_during_auto_detection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copy(CATALOGUE_DIR / "cpu.yaml", tmp_path)
    (tmp_path / "broken.yaml").write_text("description: no model or engine\n")
    monkeypatch.setenv("BENTOSPEC_CONFIG_DIR", str(tmp_path))
    _machine(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="bentospec.hardware"):
        assert select_profile().name == "cpu"
    assert "broken.yaml" in caplog.text


def test_no_fitting_profile_and_no_cpu_fallback_is_a_profile_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shutil.copy(CATALOGUE_DIR / "h100x4.yaml", tmp_path)
    monkeypatch.setenv("BENTOSPEC_CONFIG_DIR", str(tmp_path))
    _machine(monkeypatch, L4)
    with pytest.raises(ProfileError, match=r"no profile fits 1 x NVIDIA L4 .* no 'cpu' profile"):
        select_profile()


# --- detect(): NVML first, then torch.cuda, faked at the module level --------------------


class FakeNVMLError(Exception):
    """Stands for ``pynvml.NVMLError`` (e.g. no driver loaded)."""


class FakeNVML:
    """``pynvml`` with the given GPUs, as (name, total bytes); ``init_error`` fails nvmlInit."""

    def __init__(self, gpus: list[tuple[str, int]], init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.shut_down = False

    def nvmlInit(self) -> None:  # pynvml's method names
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.gpus[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.gpus[handle][1], used=0, free=self.gpus[handle][1])


def fake_torch(gpus: list[tuple[str, int]]) -> SimpleNamespace:
    cuda = SimpleNamespace(
        is_available=lambda: bool(gpus),
        device_count=lambda: len(gpus),
        get_device_name=lambda i: gpus[i][0],
        get_device_properties=lambda i: SimpleNamespace(total_memory=gpus[i][1]),
    )
    return SimpleNamespace(cuda=cuda)


H100_BYTES = 81559 * 2**20
L4_BYTES = 23034 * 2**20


def _modules(monkeypatch: pytest.MonkeyPatch, nvml: object | None, torch: object | None) -> None:
    """Install fakes (None: the module is not installed, so importing it fails)."""
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "torch", torch)


def test_detect_reads_every_gpu_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNVML([("NVIDIA H100 80GB HBM3", H100_BYTES)] * 4)
    _modules(monkeypatch, nvml, fake_torch([]))
    found = DETECT()
    assert found.gpus == (GPU(name="NVIDIA H100 80GB HBM3", memory_gib=H100_BYTES / 2**30),) * 4
    assert nvml.shut_down
    # ... and the profile choice follows what was detected.
    monkeypatch.setattr(hardware, "detect", DETECT)
    assert select_profile().name == "h100x4"


def test_detect_falls_back_to_torch_and_logs_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nvml = FakeNVML([], init_error=FakeNVMLError("Driver Not Loaded"))
    _modules(monkeypatch, nvml, fake_torch([("NVIDIA L4", L4_BYTES)]))
    with caplog.at_level(logging.INFO, logger="bentospec.hardware"):
        found = DETECT()
    assert found.gpus == (GPU(name="NVIDIA L4", memory_gib=L4_BYTES / 2**30),)
    assert "FakeNVMLError: Driver Not Loaded" in caplog.text


def test_detect_without_nvml_or_torch_finds_no_gpu_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _modules(monkeypatch, None, None)
    with caplog.at_level(logging.INFO, logger="bentospec.hardware"):
        assert DETECT() == Hardware()
    assert "NVML (nvidia-ml-py) is not installed" in caplog.text
    assert "torch is not installed" in caplog.text


def test_detect_with_torch_seeing_no_cuda_finds_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _modules(monkeypatch, None, fake_torch([]))
    assert DETECT() == Hardware()
