"""Kubernetes manifests for a profile's Bento image, and the scaling rule shared with BentoCloud.

``bentospec deploy kubernetes --profile NAME`` writes a Deployment (probes, resources, the
``HF_TOKEN`` secret reference, graceful termination), a Service and a HorizontalPodAutoscaler
on vLLM's queue, plus the Prometheus-adapter rules that turn vLLM's metrics into the HPA's
pod metrics. Everything derives from the profile, so a profile change cannot leave its
manifests behind. Why HPA + Prometheus adapter rather than KEDA: docs/deploy.md. The command
line is :mod:`bentospec.deploy_cli`'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bentospec import settings
from bentospec.profile import Profile
from bentospec.vllm_api import REQUESTS_RUNNING, REQUESTS_WAITING

#: Port ``bentoml serve`` listens on inside the image.
PORT = 3000
#: Kubernetes secrets the pods read (created by the operator, never rendered here).
HF_TOKEN_SECRET = "hf-token"
API_KEY_SECRET = "bentospec-api-key"
#: Custom metric names the Prometheus adapter serves (vLLM's, with the ``:`` made ``_``).
WAITING_METRIC = "vllm_num_requests_waiting"
RUNNING_METRIC = "vllm_num_requests_running"
#: Seconds between the engine's drain deadline and the kubelet's SIGKILL: engine shutdown.
SHUTDOWN_MARGIN_SECONDS = 30
#: Startup budget: CPU engines load in ~1-2 min; GPU ones download, load and compile weights
#: sized to their GPUs (70B over 4 GPUs: ~140 GB), so the budget grows with the GPU count.
CPU_STARTUP_SECONDS = 600
GPU_STARTUP_SECONDS = 900
PER_EXTRA_GPU_STARTUP_SECONDS = 300
STARTUP_PROBE_PERIOD_SECONDS = 10

Manifest = dict[str, Any]


def replica_concurrency(profile: Profile) -> int:
    """Requests one replica runs before the next one queues in its engine: ``max_num_seqs``.

    vLLM batches up to ``max_num_seqs`` sequences; one more waits in its queue. BentoCloud's
    ``traffic.concurrency`` (``deploy/*.yaml``) and the HPA's running-requests target use
    this, so replicas are added when a replica's batch is full, not after requests queue.
    """
    return profile.engine.max_num_seqs


def waiting_target(profile: Profile) -> int:
    """Average queued requests per pod the HPA aims at: a tenth of a full batch (at least 1).

    A queued request waits for a running one to finish, so q queued per pod adds about
    q / max_num_seqs of a request's duration to its TTFT: a tenth caps that near 10%.
    """
    return max(1, math.ceil(profile.engine.max_num_seqs / 10))


def startup_seconds(profile: Profile) -> int:
    """How long the startup probe lets the engine load before the kubelet restarts the pod."""
    gpus = profile.hardware.gpu_count
    if gpus == 0:
        return CPU_STARTUP_SECONDS
    return GPU_STARTUP_SECONDS + PER_EXTRA_GPU_STARTUP_SECONDS * (gpus - 1)


class KubernetesOptions(BaseModel):
    """What ``bentospec deploy kubernetes`` asks for besides the profile."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The Bento's OCI image: ``bentoml build --arg profile=NAME`` then ``bentoml containerize``.
    image: Annotated[str, Field(min_length=1)]
    #: Namespace written into every object; ``None`` leaves it to ``kubectl -n``.
    namespace: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] | None = None
    #: At least one: an engine load takes minutes, too long to scale from zero on a request.
    min_replicas: Annotated[int, Field(ge=1)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 4

    @model_validator(mode="after")
    def _replica_range(self) -> KubernetesOptions:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})"
            )
        return self


def _name(profile: Profile) -> str:
    return f"bentospec-{profile.name}".replace(".", "-").replace("_", "-")


def _metadata(profile: Profile, options: KubernetesOptions) -> Manifest:
    meta: Manifest = {"name": _name(profile), "labels": _labels(profile)}
    if options.namespace:
        meta["namespace"] = options.namespace
    return meta


def _labels(profile: Profile) -> dict[str, str]:
    return {"app.kubernetes.io/name": "bentospec", "app.kubernetes.io/instance": _name(profile)}


def _probe(path: str, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _secret_env(name: str, secret: str, *, optional: bool) -> Manifest:
    ref = {"name": secret, "key": name, "optional": optional}
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _resources(profile: Profile) -> Manifest:
    hardware = profile.hardware
    if hardware.accelerator == "cpu":
        requests = {key: hardware.bento_resources()[key] for key in ("cpu", "memory")}
        return {"requests": requests, "limits": {"memory": requests["memory"]}}
    gpus = str(hardware.gpu_count)
    return {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}}


def _container(profile: Profile, options: KubernetesOptions) -> Manifest:
    # Gated hub models need the token; the key is optional so a missing API-key secret
    # serves without auth rather than failing the pod.
    env = [_secret_env(settings.API_KEY.name, API_KEY_SECRET, optional=True)]
    if profile.needs_hub_token():
        env.insert(0, _secret_env(settings.HF_TOKEN.name, HF_TOKEN_SECRET, optional=False))
    container: Manifest = {
        "name": "bentospec",
        "image": options.image,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(profile),
        # /readyz turns 200 once the engine is loaded: until then liveness is not checked.
        "startupProbe": _probe(
            "/readyz",
            STARTUP_PROBE_PERIOD_SECONDS,
            math.ceil(startup_seconds(profile) / STARTUP_PROBE_PERIOD_SECONDS),
        ),
        "livenessProbe": _probe("/livez", 10, 3),
        "readinessProbe": _probe("/readyz", 5, 2),
    }
    if profile.engine.tensor_parallel_size > 1:
        # NCCL exchanges tensors through /dev/shm, which a container caps at 64 MiB.
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    return container


def deployment(profile: Profile, options: KubernetesOptions) -> Manifest:
    pod: Manifest = {
        "containers": [_container(profile, options)],
        # The engine drains for serving.drain_timeout after SIGTERM, then shuts down.
        "terminationGracePeriodSeconds": profile.serving.drain_timeout + SHUTDOWN_MARGIN_SECONDS,
    }
    if profile.engine.tensor_parallel_size > 1:
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(profile, options),
        "spec": {
            "replicas": options.min_replicas,
            "selector": {"matchLabels": _labels(profile)},
            "template": {
                "metadata": {
                    "labels": _labels(profile),
                    "annotations": {**scrape, "prometheus.io/path": "/metrics"},
                },
                "spec": pod,
            },
        },
    }


def service(profile: Profile, options: KubernetesOptions) -> Manifest:
    port = {"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(profile, options),
        "spec": {"selector": _labels(profile), "ports": [port]},
    }


def _pods_metric(name: str, average: int) -> Manifest:
    target = {"type": "AverageValue", "averageValue": str(average)}
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": target}}


def autoscaler(profile: Profile, options: KubernetesOptions) -> Manifest:
    """HPA: queued requests add replicas; full batches keep them (the HPA takes the maximum)."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(profile, options),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": _name(profile),
            },
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "metrics": [
                _pods_metric(WAITING_METRIC, waiting_target(profile)),
                _pods_metric(RUNNING_METRIC, replica_concurrency(profile)),
            ],
            # A new replica takes minutes to load its engine: do not drop one on a short lull.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        },
    }


def adapter_rules() -> Manifest:
    """prometheus-adapter Helm values serving vLLM's request gauges as pod metrics."""

    def rule(vllm_name: str, name: str) -> Manifest:
        return {
            "seriesQuery": f'{vllm_name}{{namespace!="",pod!=""}}',
            "resources": {
                "overrides": {label: {"resource": label} for label in ("namespace", "pod")}
            },
            "name": {"matches": f"^{vllm_name}$", "as": name},
            "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
        }

    rules = [
        rule(REQUESTS_WAITING, WAITING_METRIC),
        rule(REQUESTS_RUNNING, RUNNING_METRIC),
    ]
    return {"rules": {"default": False, "custom": rules}}


def manifests(profile: Profile, options: KubernetesOptions) -> list[Manifest]:
    """The objects ``kubectl apply`` takes, in apply order."""
    return [
        deployment(profile, options),
        service(profile, options),
        autoscaler(profile, options),
    ]


def write(profile: Profile, options: KubernetesOptions, out: Path) -> list[Path]:
    """Write ``manifests.yaml`` and ``prometheus-adapter-values.yaml`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        out / "manifests.yaml": yaml.safe_dump_all(manifests(profile, options), sort_keys=False),
        out / "prometheus-adapter-values.yaml": yaml.safe_dump(adapter_rules(), sort_keys=False),
    }
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return list(files)
