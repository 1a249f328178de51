"""Deployment configs: BentoCloud files agree with their profiles; Kubernetes manifests validate.

BentoCloud files are read with BentoML's own deployment schema (which silently drops unknown
keys, so the test refuses them); Kubernetes manifests are validated against the Kubernetes
OpenAPI schemas shipped in ``kubernetes-validate``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import attrs
import kubernetes_validate
import pytest
import yaml
from bentoml._internal.cloud.schemas.modelschemas import DeploymentServiceConfig
from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
from bentoml._internal.utils.cattr import bentoml_cattr

from bentospec import cli
from bentospec.kubernetes import (
    adapter_rules,
    replica_concurrency,
    startup_seconds,
    waiting_target,
)
from bentospec.profile import list_profiles, load_profile
from tests.conftest import ROOT

DEPLOY_CONFIGS = sorted((ROOT / "deploy").glob("*.yaml"))
#: Kubernetes version whose schemas the manifests must satisfy (strict: no unknown fields).
KUBERNETES_VERSION = "1.33"
HF_TOKEN = "hf_bentospec_K8S_TEST_SECRET_0042"


@pytest.fixture(scope="module")
def service_name() -> str:
    """The Bento's service name: the key of ``services:`` in a deployment config.

    Read in a subprocess: importing ``service`` builds the service's apps at import time.
    """
    code = "from service import BentoSpec; print(BentoSpec.name)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # service_name imports vLLM through service.py
@pytest.mark.parametrize("path", DEPLOY_CONFIGS, ids=lambda p: p.stem)
def test_bentocloud_config_agrees_with_its_profile(path: Path, service_name: str) -> None:
    profile = load_profile(path.stem)
    raw = yaml.safe_load(path.read_text())
    # BentoML ignores keys it does not know: a misplaced one would deploy silently without it.
    assert set(raw) <= {f.name for f in attrs.fields(CreateDeploymentSchema)}, sorted(raw)
    assert set(raw["services"]) == {service_name}
    known = {f.name for f in attrs.fields(DeploymentServiceConfig)}
    assert set(raw["services"][service_name]) <= known

    config = bentoml_cattr.structure({**raw, "bento": "x"}, CreateDeploymentSchema)
    svc = config.services[service_name]
    concurrency = svc.config_overrides["traffic"]["concurrency"]
    assert concurrency == replica_concurrency(profile) == profile.engine.max_num_seqs
    assert concurrency <= profile.serving.max_concurrency
    assert svc.scaling.max_replicas >= max(1, svc.scaling.min_replicas or 0)
    kind, *gpu = svc.instance_type.split(".")
    if profile.hardware.accelerator == "cpu":
        assert kind == "cpu"
    else:
        assert (kind, int(gpu[-1])) == ("gpu", profile.hardware.gpu_count), svc.instance_type
    assert ("hf-token" in config.secrets) == profile.needs_hub_token()


def render(profile_name: str, out: Path, *args: str) -> list[dict]:
    command = ["deploy", "kubernetes", "--profile", profile_name, "--out", str(out), *args]
    assert cli.main(command) == 0
    return list(yaml.safe_load_all((out / "manifests.yaml").read_text()))


@pytest.mark.parametrize("name", list_profiles())
def test_kubernetes_manifests_validate_and_follow_the_profile(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    profile = load_profile(name)
    objects = {m["kind"]: m for m in render(name, tmp_path, "--image", "reg.example/bs:1")}
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for manifest in objects.values():
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    for written in tmp_path.iterdir():
        assert HF_TOKEN not in written.read_text(), f"HF_TOKEN value leaked into {written}"

    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "reg.example/bs:1"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= startup_seconds(profile)
    assert pod["terminationGracePeriodSeconds"] > profile.serving.drain_timeout
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert ("HF_TOKEN" in secrets) == profile.needs_hub_token()
    limits = container["resources"]["limits"]
    assert int(limits.get("nvidia.com/gpu", 0)) == profile.hardware.gpu_count

    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    served = {rule["name"]["as"] for rule in adapter_rules()["rules"]["custom"]}
    targets = {
        m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["metrics"]
    }
    assert set(targets) == served
    assert set(targets.values()) == {
        str(waiting_target(profile)),
        str(replica_concurrency(profile)),
    }


def test_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """The schema check is live: a wrong type or an unknown field fails it."""
    (deployment, *_) = render("cpu", tmp_path)
    pod = deployment["spec"]["template"]["spec"]
    for breakage in ({"terminationGracePeriodSeconds": "sixty"}, {"drainTimeout": 30}):
        broken = {
            **deployment,
            "spec": {**deployment["spec"], "template": {"spec": {**pod, **breakage}}},
        }
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "nope"], r"unknown profile 'nope'"),
        (["--profile", "cpu", "--min-replicas", "3", "--max-replicas", "2"], r"max_replicas"),
        (["--profile", "cpu", "--namespace", "Not_Valid"], r"namespace"),
    ],
)
def test_kubernetes_command_refuses_bad_input(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["deploy", "kubernetes", "--out", str(tmp_path), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "manifests.yaml").exists()
