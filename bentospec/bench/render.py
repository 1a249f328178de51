"""A benchmark report as Markdown and a plot, and the files a run writes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from bentospec.bench.checks import GreedyAgreement
from bentospec.bench.commands import bench_command
from bentospec.bench.figures import ConfigStats, ViaRatio, speedup_targets
from bentospec.bench.prompt_plan import UNSEEN_LEVEL_MIN
from bentospec.bench.records import WORKLOADS, BenchRow, BenchSettings
from bentospec.bench.report import BenchReport
from bentospec.bench.stats import Spread
from bentospec.profile import SpeculativeSpec

#: Markers in a document between which ``--doc`` splices the rendered results.
DOC_START, DOC_END = "<!-- bench:start -->", "<!-- bench:end -->"


def describe(spec: SpeculativeSpec | None) -> str:
    """A speculative config in one cell: method, k, lookup window, batch-size schedules (the
    default one, then each host class's)."""
    if spec is None:
        return "none"
    text = f"{spec.method} k={spec.num_speculative_tokens}"
    if spec.prompt_lookup_max is not None:
        text += f" n={spec.prompt_lookup_min or 1}..{spec.prompt_lookup_max}"
    schedules = {"": spec.num_speculative_tokens_per_batch_size, **(spec.host_schedules or {})}
    for host_class, schedule in schedules.items():
        if schedule:
            steps = ", ".join(f"{a}-{b}:{k}" for a, b, k in schedule)
            text += f" ({host_class + ': ' if host_class else ''}batch {steps})"
    return text


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _spread(value: Spread | None, fmt: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else value.text(fmt, suffix)


def markdown_table(
    headers: Sequence[str], cells: Iterable[Sequence[str]], text_columns: int = 1
) -> str:
    """A GitHub Markdown table: the first ``text_columns`` left-aligned, numbers right-aligned."""
    align = [":---"] * text_columns + ["---:"] * (len(headers) - text_columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def stats_table(stats: Sequence[ConfigStats]) -> str:
    """One line per config, workload and concurrency: medians over rounds (range)."""
    return markdown_table(
        [
            "config",
            "via",
            "workload",
            "speculation",
            "concurrency",
            "tokens/s",
            "speedup",
            "TTFT p50 ms",
            "ITL p50 ms",
            "acceptance rate",
            "acceptance length",
            "tokens per round",
            "load avg",
        ],
        (
            [
                s.label,
                s.via,
                s.workload,
                describe(s.speculative),
                str(s.concurrency),
                _spread(s.tokens_per_s),
                _spread(s.speedup, ".2f", "x"),
                _spread(s.ttft_ms_p50, ".0f"),
                _spread(s.itl_ms_p50),
                _num(s.acceptance_rate, ".2f"),
                _num(s.mean_acceptance_length, ".2f"),
                ", ".join(map(str, s.tokens)),
                _spread(s.load_avg),
            ]
            for s in stats
        ),
        text_columns=4,
    )


def rounds_table(rows: Sequence[BenchRow]) -> str:
    """Tokens/s of every round, one line per config, workload and concurrency."""
    series: dict[tuple[str, str, str, int], dict[int, float]] = defaultdict(dict)
    for r in rows:
        series[(r.label, r.via, r.workload, r.concurrency)][r.round] = r.tokens_per_s
    rounds = sorted({r.round for r in rows})
    return markdown_table(
        ["config", "via", "workload", "concurrency", *(f"round {n}" for n in rounds)],
        (
            [label, via, workload, str(level), *(_num(values.get(n)) for n in rounds)]
            for (label, via, workload, level), values in series.items()
        ),
        text_columns=3,
    )


def ratios_table(ratios: Sequence[ViaRatio]) -> str:
    return markdown_table(
        ["config", "workload", "concurrency", "compared", "tokens/s ratio", "TTFT p50 delta ms"],
        (
            [
                r.config,
                r.workload,
                str(r.concurrency),
                f"{r.via} / {r.against}",
                _spread(r.ratio, ".2f"),
                _spread(r.ttft_delta_ms, "+.0f"),
            ]
            for r in ratios
        ),
        text_columns=2,
    )


def _runtimes(rows: Sequence[BenchRow]) -> list[str]:
    """One line naming each config's engine-core OpenMP library and allocator, if known."""
    seen = {
        r.key: f"{r.runtime.openmp or 'no OpenMP'} + {r.runtime.allocator}"
        + (f", worker threads on cores {r.runtime.worker_cpus}" if r.runtime.worker_cpus else "")
        for r in rows
        if r.runtime is not None
    }
    if not seen:
        return []
    return ["Engine-core runtime: " + "; ".join(f"{k}: {v}" for k, v in seen.items()) + "."]


def _host(report: BenchReport) -> list[str]:
    """The CPU, its class and the dtype each config's engine ran (one line)."""
    cpu = report.provenance.cpu
    if cpu is None:
        return []
    dtypes = sorted(
        {str(setup.get("engine_args", {}).get("dtype")) for setup in report.configs.values()}
    )
    return [f"CPU: {cpu.model}, class {cpu.host_class}; dtype {' / '.join(dtypes)}."]


def _reuse(settings: BenchSettings) -> str:
    """How the run kept (or, for repeated documents, did not keep) caches out of its figures."""
    per_slot = settings.requests_per_slot
    if settings.prompt_reuse == "repeated":
        return (
            "Repeated documents: every level cycles through the same prompts, the warm-up "
            f"too, sending max(prompts, {per_slot} x concurrency) streaming requests, so caches "
            "that remember requests (prefix cache, suffix's global tree) gain from repetition."
        )
    lives = "the whole run" if settings.servers_outlive_rounds else "one round"
    return (
        "Unseen prompts: every server gets each prompt at most once in its life "
        f"({lives}), the warm-up on prompts no level measures; each level sends "
        f"max({UNSEEN_LEVEL_MIN}, {per_slot} x concurrency) streaming requests."
    )


def _load(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def render_markdown(report: BenchReport) -> str:
    """Settings and provenance, the figures with their spreads, peer ratios, targets, checks."""
    settings, prov = report.settings, report.provenance
    workloads = ", ".join(
        f"{w} (temperature {WORKLOADS[w].temperature:g}, top_p {WORKLOADS[w].top_p:g})"
        for w in settings.workloads
    )
    commit = (prov.git_commit or "unknown")[:12] + (" with local changes" if prov.git_dirty else "")
    parts = [
        f"{len(report.prompt_ids)} prompts ({', '.join(settings.categories) or 'all categories'})"
        f" from `{Path(settings.prompts).name if settings.prompts else 'prompts.jsonl'}`, "
        f"max_tokens {settings.max_tokens}, workloads: {workloads}. {_reuse(settings)} Configs "
        f"run interleaved in {settings.rounds} rounds, each figure is the median over rounds "
        "with the range in brackets, speedups are paired within a round. Tokens are counted "
        "from the token ids of each response and checked against the engine's "
        "`vllm:generation_tokens`.",
        f"Code {commit}, vLLM {prov.vllm_version}, BentoML {prov.bentoml_version}, "
        f"{prov.cpu_count} CPUs, load average (1/5/15 min) {_load(prov.load_avg_start)} at the "
        f"start and {_load(prov.load_avg_end)} at the end, "
        f"{report.started_at:%Y-%m-%d %H:%M}-{report.finished_at:%H:%M} UTC"
        + (f", environment {prov.env}" if prov.env else "")
        + ".",
        *_host(report),
        *_runtimes(report.rows),
        f"Reproduce: `{bench_command(settings)}`",
        "Results (median over rounds, range in brackets):",
        stats_table(report.stats),
        "Tokens/s per round:",
        rounds_table(report.rows),
    ]
    if report.ratios:
        parts += [
            "Same config, two servers (streaming `/v1/completions` through the same client), "
            "paired by round:",
            ratios_table(report.ratios),
        ]
    if report.targets:
        parts += [
            "Targets (medians):",
            markdown_table(
                ["target", "config", "measured", "target", "met"],
                (
                    [t.target, t.config, t.measured.text(), f">= {t.threshold:g}", _yes(t.met)]
                    for t in report.targets
                ),
                text_columns=2,
            ),
        ]
    if report.agreement:
        parts += [
            "Greedy outputs against no speculation where the dtype is not float32 (a row's "
            "logits there depend on the rows batched with it, so a near-tie may flip; "
            "reported, not failed):",
            agreement_table(report.agreement),
        ]
    exact = "greedy float32 configs" if report.agreement else "greedy configs"
    parts.append(
        "Checks: **FAILED**\n\n" + "\n".join(f"- {p}" for p in report.problems)
        if report.problems
        else f"Checks: every response's token count matched the engine counter; {exact} "
        "generated the same token totals for the same requests."
    )
    return "\n\n".join(parts) + "\n"


def agreement_table(rows: Sequence[GreedyAgreement]) -> str:
    return markdown_table(
        ["config", "concurrency", "round", "identical outputs", "first divergence p50"],
        (
            [
                a.config,
                str(a.concurrency),
                str(a.round),
                f"{a.identical} / {a.requests}",
                _num(a.first_divergence_p50, ".0f"),
            ]
            for a in rows
        ),
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def plot(stats: Sequence[ConfigStats], categories: Sequence[str], path: Path) -> None:
    """Tokens/s, speedup and ITL against concurrency (medians, bars spanning the rounds)."""
    from matplotlib.figure import Figure

    series: dict[tuple[str, str, str], list[ConfigStats]] = defaultdict(list)
    for s in stats:
        series[(s.label, s.via, s.workload)].append(s)
    levels = sorted({s.concurrency for s in stats})
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    throughput, gain, itl = figure.subplots(1, 3)
    for i, ((label, via, workload), points) in enumerate(series.items()):
        style = {
            "label": f"{label} ({via}, {workload})",
            "color": f"C{i}",
            "marker": "o",
            "linestyle": "-" if workload == "greedy" else "--",
            "capsize": 3,
        }
        for axes, values in (
            (throughput, [p.tokens_per_s for p in points]),
            (gain, [p.speedup for p in points]),
            (itl, [p.itl_ms_p50 for p in points]),
        ):
            drawn = [(p.concurrency, v) for p, v in zip(points, values, strict=True) if v]
            if drawn:
                x = [c for c, _ in drawn]
                y = [v.median for _, v in drawn]
                err = [[v.median - v.low for _, v in drawn], [v.high - v.median for _, v in drawn]]
                axes.errorbar(x, y, yerr=err, **style)
    gain.axhline(1.0, color="grey", linewidth=0.8)
    targets = speedup_targets(categories, levels)
    gain.plot(list(targets), list(targets.values()), "k_", markersize=14, label="target")
    for axes, title in (
        (throughput, "output tokens/s"),
        (gain, "speedup vs no speculation (same round)"),
        (itl, "inter-token latency p50 (ms)"),
    ):
        axes.set_title(title)
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(c) for c in levels])
        axes.set_xlabel("concurrency")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    throughput.legend(fontsize="small")
    figure.savefig(path, dpi=110)


def splice(document: str, block: str) -> str:
    """``document`` with the text between :data:`DOC_START` and :data:`DOC_END` replaced."""
    head, start, rest = document.partition(DOC_START)
    _, end, tail = rest.partition(DOC_END)
    if not start or not end:
        raise ValueError(f"the document has no {DOC_START} ... {DOC_END} block")
    return f"{head}{DOC_START}\n{block.strip()}\n{DOC_END}{tail}"


def write_report(report: BenchReport, out: Path) -> str:
    """Write results.json, results.md and results.png into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = render_markdown(report)
    (out / "results.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(text, encoding="utf-8")
    plot(report.stats, report.settings.categories, out / "results.png")
    return text
