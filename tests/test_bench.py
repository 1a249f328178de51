"""Benchmark math, aggregation and rendering: pure functions, no engine."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from bentospec import bench
from bentospec.bench import (
    BenchReport,
    BenchRow,
    BenchSettings,
    ConfigId,
    Counters,
    RequestRecord,
)
from bentospec.cli import build_parser
from bentospec.metrics import SpecCounters
from bentospec.profile import SpeculativeSpec, load_profile

NGRAM = SpeculativeSpec(
    method="ngram", num_speculative_tokens=5, prompt_lookup_min=2, prompt_lookup_max=5
)


def make_row(
    config: str = "cpu",
    concurrency: int = 1,
    tokens_per_s: float = 100.0,
    speculative: SpeculativeSpec | None = NGRAM,
    via: bench.Via = "engine",
    speedup: float | None = None,
) -> BenchRow:
    """A row measuring ``tokens_per_s`` (1000 tokens over the matching wall time)."""
    return BenchRow(
        config=config,
        via=via,
        model="m",
        speculative=speculative,
        concurrency=concurrency,
        requests=4,
        output_tokens=1000,
        wall_s=1000 / tokens_per_s,
        ttft_ms_p50=50.0,
        ttft_ms_p95=80.0,
        itl_ms_p50=10.0,
        itl_ms_p95=20.0,
        spec=SpecCounters(drafts=10, draft_tokens=50, accepted_tokens=20)
        if speculative
        else SpecCounters(),
        speedup=speedup,
        load_avg=0.5,
    )


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
    assert bench.percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_none() -> None:
    assert bench.percentile([], 50) is None


def test_record_splits_chunk_gaps_over_their_tokens() -> None:
    # First token at 0.1 s, one at 0.2 s, then a speculative step of 3 tokens at 0.5 s.
    record = bench.record_from_chunks(0.0, [(0.1, 1), (0.2, 1), (0.3, 0), (0.5, 3)])
    assert record.ttft_s == pytest.approx(0.1)
    assert record.itl_s == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_record_needs_tokens() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        bench.record_from_chunks(0.0, [(0.1, 0)])


def test_token_chunks_count_growth_of_the_text_so_far() -> None:
    words = lambda text: len(text.split())  # noqa: E731 - a tokenizer stand-in
    pieces = [(1.0, "Hello"), (2.0, " wor"), (3.0, "ld"), (4.0, " again !")]
    assert bench.token_chunks(pieces, words) == [(1.0, 1), (2.0, 1), (3.0, 0), (4.0, 2)]


def test_token_chunks_never_go_negative() -> None:
    shrinking = iter([3, 2, 4])
    chunks = bench.token_chunks([(1.0, "a"), (2.0, "b"), (3.0, "c")], lambda _: next(shrinking))
    assert chunks == [(1.0, 3), (2.0, 0), (3.0, 1)]


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


def test_summarize_aggregates_records_and_counters() -> None:
    config = ConfigId(config="cpu", via="engine", model="m", speculative=NGRAM)
    records = [
        RequestRecord(ttft_s=0.1, itl_s=[0.01, 0.03]),
        RequestRecord(ttft_s=0.3, itl_s=[0.02]),
    ]
    counters = Counters(
        generation_tokens=6, spec=SpecCounters(drafts=4, draft_tokens=12, accepted_tokens=6)
    )
    row = bench.summarize(config, 2, records, 2.0, counters, 1.5)
    assert (row.config, row.via, row.concurrency, row.requests) == ("cpu", "engine", 2, 2)
    # Tokens/s counts the engine's generated tokens (EOS included), not the stream's.
    assert row.output_tokens == 6
    assert row.tokens_per_s == pytest.approx(3.0)
    assert row.ttft_ms_p50 == pytest.approx(200)
    assert row.ttft_ms_p95 == pytest.approx(290)
    assert row.itl_ms_p50 == pytest.approx(20)
    assert row.acceptance_rate == pytest.approx(0.5)
    assert row.mean_acceptance_length == pytest.approx(2.5)
    assert row.speedup is None
    assert row.load_avg == 1.5


def test_speedup_is_against_the_baseline_at_the_same_concurrency() -> None:
    rows = bench.with_speedups(
        [
            make_row(bench.NO_SPEC, 1, 50.0, speculative=None),
            make_row(bench.NO_SPEC, 4, 100.0, speculative=None),
            make_row("cpu", 1, 100.0),
            make_row("cpu", 4, 90.0),
            make_row("cpu", 4, 95.0, via="service"),  # no baseline through the service
        ]
    )
    assert [r.speedup for r in rows] == [None, None, pytest.approx(2.0), pytest.approx(0.9), None]
    assert bench.speedup(10.0, None) is None
    assert bench.speedup(10.0, 0.0) is None


def test_service_ratio_pairs_engine_and_service_rows() -> None:
    rows = [
        make_row("cpu", 1, 100.0),
        make_row("cpu", 2, 150.0),
        make_row("cpu", 1, 96.0, via="service"),
        make_row("cpu", 2, 120.0, via="service"),
        make_row("cpu-draft", 1, 50.0),
    ]
    ratios = bench.service_ratios(rows)
    assert [(r.config, r.concurrency) for r in ratios] == [("cpu", 1), ("cpu", 2)]
    assert [r.ratio for r in ratios] == [pytest.approx(0.96), pytest.approx(0.8)]


def test_target_checks() -> None:
    draft = SpeculativeSpec(method="draft_model", model="d", num_speculative_tokens=3)
    rows = [
        make_row("cpu", 1, speedup=2.1),
        make_row("cpu", 16, speedup=0.9),
        make_row("cpu-draft", 1, speculative=draft, speedup=0.5),  # 2x is ngram's target only
        make_row("cpu-draft", 16, speculative=draft, speedup=0.97),
    ]
    ratios = bench.service_ratios(
        [make_row("cpu", 1, 100.0), make_row("cpu", 1, 94.0, via="service")]
    )
    checks = {(c.target, c.config): c.met for c in bench.target_checks(rows, ratios)}
    assert checks == {
        ("tokens/s vs no-spec at concurrency 1", "cpu"): True,
        ("tokens/s vs no-spec at concurrency 16", "cpu"): False,
        ("tokens/s vs no-spec at concurrency 16", "cpu-draft"): True,
        ("service/engine tokens/s at concurrency 1", "cpu"): False,
    }


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


def test_service_client_streams_greedy_requests_and_reads_metrics() -> None:
    """The HTTP side against a fake service: what it sends, how it counts what comes back."""
    sent: list[dict[str, object]] = []

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"The", b" answer", b" is", b" 42"):
            yield piece

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=METRICS)
        sent.append(json.loads(request.content))
        return httpx.Response(200, content=pieces())

    async def run() -> tuple[RequestRecord, Counters]:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            client = bench.ServiceClient(http, lambda text: len(text.split()))
            return await client.request("prompt", 16), await client.counters()

    record, counters = asyncio.run(run())
    # Greedy, and never top_k: it crashes vLLM's CPU rejection sampler.
    assert sent == [{"prompt": "prompt", "max_tokens": 16, "temperature": 0.0}]
    assert record.ttft_s >= 0
    assert len(record.itl_s) == 3  # four one-word pieces: three gaps after the first
    assert counters == Counters(
        generation_tokens=42, spec=SpecCounters(drafts=4, draft_tokens=20, accepted_tokens=8)
    )


def test_service_client_refuses_metrics_without_vllm_counters() -> None:
    """A /metrics emptied by another server's start must not read as 0 tokens/s."""

    async def run() -> Counters:
        transport = httpx.MockTransport(lambda _: httpx.Response(200, text="# nothing\n"))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            return await bench.ServiceClient(http, len).counters()

    with pytest.raises(RuntimeError, match="BENTOML_HOME"):
        asyncio.run(run())


def test_config_summary_over_levels() -> None:
    rows = bench.with_speedups(
        [
            make_row(bench.NO_SPEC, 1, 50.0, speculative=None),
            make_row(bench.NO_SPEC, 4, 100.0, speculative=None),
            make_row(bench.NO_SPEC, 16, 100.0, speculative=None),
            make_row("cpu", 1, 100.0),
            make_row("cpu", 4, 120.0),
            make_row("cpu", 16, 90.0),
        ]
    )
    (summary,) = bench.summarize_configs(rows)
    assert (summary.config, summary.via, summary.speculative) == ("cpu", "engine", NGRAM)
    assert summary.speedups == {
        1: pytest.approx(2.0),
        4: pytest.approx(1.2),
        16: pytest.approx(0.9),
    }
    assert summary.median_speedup == pytest.approx(1.2)
    assert summary.spec == SpecCounters(drafts=30, draft_tokens=150, accepted_tokens=60)


def test_plan_runs_one_baseline_per_model_then_each_method() -> None:
    cpu, draft, nospec = (load_profile(n) for n in ("cpu", "cpu-draft", "cpu-nospec"))
    planned = bench.plan([cpu, nospec, draft])
    assert [p.name for p in planned] == [bench.NO_SPEC, "cpu", "cpu-draft"]
    assert planned[0].speculative is None
    assert planned[0].engine == cpu.engine
    runs = bench.engine_runs([cpu])
    assert [(r.config.config, r.config.via) for r in runs] == [
        (bench.NO_SPEC, "engine"),
        ("cpu", "engine"),
    ]


def test_results_table_renders_one_line_per_row() -> None:
    rows = bench.with_speedups(
        [make_row(bench.NO_SPEC, 1, 50.0, speculative=None), make_row("cpu", 1, 100.0)]
    )
    lines = bench.results_table(rows).splitlines()
    assert lines[0].startswith("| config | via | speculation | concurrency | tokens/s | speedup |")
    assert lines[1].startswith("|:---|:---|:---|---:|")
    assert (
        lines[2] == "| no-spec | engine | none | 1 | 50.0 | - | 50 / 80 | 10 / 20 | - | - | 0.5 |"
    )
    assert lines[3] == (
        "| cpu | engine | ngram k=5 n=2..5 | 1 | 100.0 | 2.00x | 50 / 80 | 10 / 20 | 0.40 | 3.00 "
        "| 0.5 |"
    )
    assert len(lines) == 4


def test_describe_schedule() -> None:
    spec = NGRAM.model_copy(
        update={"num_speculative_tokens_per_batch_size": ((1, 4, 5), (5, 16, 0))}
    )
    assert bench.describe(spec) == "ngram k=5 n=2..5 (batch 1-4:5, 5-16:0)"


def report(rows: list[BenchRow]) -> BenchReport:
    return BenchReport(
        settings=BenchSettings(
            profiles=["cpu"], categories=["rag"], concurrency=[1], compare_service=True
        ),
        prompts=10,
        cpu_count=2,
        started_at=datetime(2025, 1, 1, tzinfo=UTC),
        finished_at=datetime(2025, 1, 1, 0, 10, tzinfo=UTC),
        rows=bench.with_speedups(rows),
    )


def test_settings_command_reproduces_the_settings() -> None:
    settings = BenchSettings(
        profiles=["cpu", "cpu-draft"],
        categories=["rag"],
        num_prompts=5,
        max_tokens=64,
        concurrency=[1, 16],
        compare_service=True,
        out="docs/bench",
    )
    args = build_parser().parse_args(shlex.split(settings.command())[1:])
    assert args.profiles == settings.profiles
    assert args.categories == settings.categories
    assert (args.num_prompts, args.max_tokens, args.concurrency) == (5, 64, [1, 16])
    assert args.compare_service and args.url is None
    assert args.out == Path("docs/bench")


def test_markdown_and_report_files_round_trip(tmp_path: Path) -> None:
    rows = [
        make_row(bench.NO_SPEC, 1, 50.0, speculative=None),
        make_row("cpu", 1, 100.0),
        make_row("cpu", 1, 97.0, via="service"),
    ]
    original = report(rows)
    text = bench.write_report(original, tmp_path)
    assert "Reproduce: `bentospec bench --profile cpu --categories rag" in text
    assert "| cpu | engine | ngram k=5 n=2..5 | 2.00x | 2.00x | 0.40 | 3.00 |" in text  # summary
    assert "| cpu | 1 | 100.0 | 97.0 | 0.97 |" in text  # service overhead table
    assert "| tokens/s vs no-spec at concurrency 1 | cpu | 2.00 | >= 2 | yes |" in text
    assert (tmp_path / "results.md").read_text() == text
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["service"][0]["ratio"] == pytest.approx(0.97)
    # --render: the JSON alone reproduces the Markdown.
    loaded = BenchReport.model_validate_json((tmp_path / "results.json").read_text())
    assert bench.render_markdown(loaded) == text


def test_splice_replaces_only_the_marked_block() -> None:
    doc = f"intro\n{bench.DOC_START}\nold\n{bench.DOC_END}\noutro\n"
    assert bench.splice(doc, "new table\n") == (
        f"intro\n{bench.DOC_START}\nnew table\n{bench.DOC_END}\noutro\n"
    )
    with pytest.raises(ValueError, match="no"):
        bench.splice("no markers", "x")


@pytest.mark.parametrize("text", ["", "0,1", "a,b", "1,-2"])
def test_int_list_rejects_bad_levels(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        bench.int_list(text)


def test_int_list() -> None:
    assert bench.int_list("1,2,4,8,16") == [1, 2, 4, 8, 16]
