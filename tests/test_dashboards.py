"""Grafana dashboard and Prometheus alert rules in ``deploy/``: they query what the service exports.

Every metric and label a panel or a rule references must exist on a running service's
``/metrics``; the rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``; ``make system-deps`` installs Debian's ``prometheus`` for promtool).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bentospec.kubernetes import adapter_rules
from tests.conftest import ROOT, BentoServer

DASHBOARD = ROOT / "deploy" / "grafana" / "bentospec-speculation.json"
RULES = ROOT / "deploy" / "prometheus" / "bentospec-alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "bentospec-alerts.test.yaml"

#: Labels Prometheus attaches to every scraped series (the target's), not on ``/metrics``.
TARGET_LABELS = frozenset({"instance", "job"})
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset"}
)


@dataclass
class References:
    """Metric names and label names one query uses."""

    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)


def promql_references(expr: str) -> References:
    """Metric and label names in a PromQL expression (enough of PromQL for these files)."""
    refs = References()
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, Grafana variables
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors, subqueries
    for body in re.findall(r"\{([^}]*)\}", expr):
        refs.labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    for body in re.findall(_GROUPING, expr):
        refs.labels |= {name.strip() for name in body.split(",") if name.strip()}
    expr = re.sub(_GROUPING, " ", expr)
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", expr):
        is_function = expr[match.end() :].lstrip().startswith("(")
        if not is_function and match.group() not in _KEYWORDS:
            refs.metrics.add(match.group())
    return refs


def template_labels(text: str) -> set[str]:
    """Labels in Grafana legends (``{{label}}``) and rule annotations (``$labels.label``)."""
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text)) | set(re.findall(r"\$labels\.(\w+)", text))


def dashboard_queries() -> Iterator[tuple[str, References]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(
                r"label_values\((\S+),\s*(\w+)\)", variable["definition"]
            ).groups()
            yield f"variable {variable['name']}", References({metric}, {label})
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            refs = promql_references(target["expr"])
            refs.labels |= template_labels(target.get("legendFormat", ""))
            yield f"panel {panel['title']!r} {target['refId']}", refs


def rule_queries() -> Iterator[tuple[str, References]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            refs = promql_references(rule["expr"])
            refs.labels |= template_labels(json.dumps(rule.get("annotations", {})))
            yield f"alert {rule['alert']}", refs


def adapter_queries() -> Iterator[tuple[str, References]]:
    """The Prometheus-adapter rules behind the Kubernetes autoscaler read vLLM's gauges too."""
    for rule in adapter_rules()["rules"]["custom"]:
        refs = promql_references(rule["seriesQuery"])
        refs.labels -= {"namespace", "pod"}  # attached by the Kubernetes scrape job
        yield f"adapter rule {rule['name']['as']}", refs


def test_promql_references_finds_metrics_and_labels() -> None:
    refs = promql_references(
        'histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:x_bucket{a=~"$v"}[5m])))'
        " / ignoring(position) group_left sum(rate(y_total[$__rate_interval])) > bool 1"
    )
    assert refs.metrics == {"vllm:x_bucket", "y_total"}
    assert refs.labels == {"le", "model_name", "a", "position"}
    assert template_labels("{{ position }} on {{instance}} / {{ $labels.pod }}") == {
        "position",
        "instance",
        "pod",
    }


@pytest.mark.slow
def test_alert_rules_pass_promtool() -> None:
    for args in (["check", "rules", RULES.name], ["test", "rules", RULE_TESTS.name]):
        done = subprocess.run(
            ["promtool", *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is valid PromQL."""
    dashboard = json.loads(DASHBOARD.read_text())
    rules = [
        {"record": f"panel_{panel['id']}_{target['refId']}", "expr": grafana_to_promql(target)}
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def grafana_to_promql(target: dict) -> str:
    return target["expr"].replace("$__rate_interval", "5m").replace("$model_name", ".*")


def exported(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names it carries, from a Prometheus text exposition."""
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


@pytest.mark.server
def test_dashboard_and_rules_reference_only_exported_metrics(server: BentoServer) -> None:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        # A prompt that repeats itself, so ngram drafts, then one more request to flush the
        # spec-decode stats vLLM records with the next step.
        prompt = "Repeat: one two three, one two three, one two three, one two"
        for body in ({"prompt": prompt, "max_tokens": 24}, {"prompt": "Hi", "max_tokens": 2}):
            assert client.post("/generate_full", json=body).status_code == 200
        deadline = time.monotonic() + 30
        while True:
            samples = exported(client.get("/metrics").text)
            histogram = "vllm:time_to_first_token_seconds_bucket"
            if histogram in samples or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    problems = []
    for where, refs in [*dashboard_queries(), *rule_queries(), *adapter_queries()]:
        assert refs.metrics, f"{where}: no metric found in the query"
        missing = sorted(refs.metrics - samples.keys())
        if missing:
            problems.append(f"{where}: metrics not on /metrics: {missing}")
            continue
        labels = set().union(*(samples[m] for m in refs.metrics)) | TARGET_LABELS
        if refs.labels - labels:
            problems.append(f"{where}: labels not on its metrics: {sorted(refs.labels - labels)}")
    assert not problems, "\n".join(problems)


@pytest.mark.server
def test_profile_info_and_engine_ready_gauges(server: BentoServer) -> None:
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    info = (
        ("accelerator", "cpu"),
        ("method", "ngram"),
        ("model_name", "smollm2-135m-instruct"),
        ("profile", "cpu"),
    )
    assert values[("bentospec_profile_info", info)] == 1
    assert values[("bentospec_engine_ready", (("model_name", "smollm2-135m-instruct"),))] == 1
