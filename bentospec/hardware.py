"""Detect the accelerators of this machine and pick the profile that fits them best.

An explicit choice (``BENTOSPEC_PROFILE`` or ``bentoml serve --arg profile=...``) always wins;
the decision and the reason for it are logged.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict

from bentospec import settings
from bentospec.profile import Profile, ProfileError, list_profiles, load_profile, profile_path

logger = logging.getLogger(__name__)

#: Name of the profile used when no GPU is found.
CPU_PROFILE = "cpu"
#: Detected memory may be reported a little below the marketing size (80 GB -> 79.6 GiB).
_MEMORY_TOLERANCE = 0.95


class GPU(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    memory_gib: float


class Hardware(BaseModel):
    model_config = ConfigDict(frozen=True)

    gpus: tuple[GPU, ...] = ()

    def describe(self) -> str:
        if not self.gpus:
            return "no CUDA GPU"
        return f"{len(self.gpus)} x {self.gpus[0].name} ({self.gpus[0].memory_gib:.0f} GiB)"


def detect() -> Hardware:
    """CUDA GPUs via NVML (``nvidia-ml-py``), else torch; none if neither sees a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            return Hardware(
                gpus=tuple(
                    GPU(
                        name=str(pynvml.nvmlDeviceGetName(h)),
                        memory_gib=pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
                    )
                    for h in handles
                )
            )
        finally:
            pynvml.nvmlShutdown()
    except ImportError:
        logger.info("NVML (nvidia-ml-py) is not installed: asking torch for CUDA GPUs")
    except Exception as exc:  # pynvml.NVMLError and anything else the driver raises
        logger.info(
            "NVML found no GPU (%s: %s): asking torch for CUDA GPUs", type(exc).__name__, exc
        )
    try:
        import torch

        if torch.cuda.is_available():
            return Hardware(
                gpus=tuple(
                    GPU(
                        name=torch.cuda.get_device_name(i),
                        memory_gib=torch.cuda.get_device_properties(i).total_memory / 2**30,
                    )
                    for i in range(torch.cuda.device_count())
                )
            )
    except ImportError:
        logger.info("torch is not installed: assuming no CUDA GPU")
    return Hardware()


def fits(profile: Profile, hardware: Hardware) -> bool:
    """Whether ``profile`` can run on ``hardware``."""
    spec = profile.hardware
    if spec.accelerator == "cpu":
        return True
    if len(hardware.gpus) < spec.gpu_count or spec.gpu_memory_gib is None:
        return False
    gpus = hardware.gpus[: spec.gpu_count]
    if any(g.memory_gib < spec.gpu_memory_gib * _MEMORY_TOLERANCE for g in gpus):
        return False
    return not spec.gpu_names or any(
        needle.lower() in g.name.lower() for needle in spec.gpu_names for g in gpus
    )


def best_profile(profiles: list[Profile], hardware: Hardware) -> Profile:
    """The fitting profile that uses the most of the machine: GPUs, then memory per GPU.

    Among equals a name match (``gpu_names``) beats a generic fit; ``cpu`` is the fallback.
    """
    fitting = [p for p in profiles if fits(p, hardware) and p.hardware.accelerator == "cuda"]
    if not fitting:
        fallback = next((p for p in profiles if p.name == CPU_PROFILE), None)
        if fallback is None:
            raise ProfileError(
                f"no profile fits {hardware.describe()} and there is no {CPU_PROFILE!r} profile "
                "to fall back to; add one or choose a profile explicitly"
            )
        return fallback
    return max(
        fitting,
        key=lambda p: (
            p.hardware.gpu_count,
            bool(p.hardware.gpu_names),
            p.hardware.gpu_memory_gib or 0.0,
        ),
    )


def select_profile(explicit: str | None = None) -> Profile:
    """The profile to serve: ``explicit``, else ``BENTOSPEC_PROFILE``, else auto-detected."""
    name = explicit or settings.PROFILE.get()
    if name:
        profile = load_profile(name)
        logger.info("profile %r chosen explicitly", name)
        return profile
    hardware = detect()
    profiles = []
    for candidate in list_profiles():
        try:
            profiles.append(load_profile(candidate))
        except ProfileError as exc:
            logger.warning("skipping invalid profile during auto-detection: %s", exc)
    profile = best_profile(profiles, hardware)
    logger.info(
        "profile %r auto-detected for %s (file %s)",
        profile.name,
        hardware.describe(),
        profile_path(profile.name),
    )
    return profile
