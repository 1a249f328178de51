"""Autotuner: candidates, the prompt split, the choice and schedule from given measurements,
levers, the validation verdict, the profile it writes, and one short real run."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bentospec import tune, tune_cli
from bentospec.bench.commands import tune_command
from bentospec.bench.records import NO_SPEC, BenchRow
from bentospec.cli import build_parser
from bentospec.cpu_host import HOST_CLASSES
from bentospec.dataset import load_cases
from bentospec.profile import SpeculativeSpec, load_profile, load_profile_file, profile_yaml
from tests.conftest import ROOT, make_row


def ngram(k: int, lo: int = 2, hi: int = 5) -> SpeculativeSpec:
    return SpeculativeSpec(
        method="ngram", num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi
    )


def measured(
    baseline: dict[int, float],
    candidates: dict[SpeculativeSpec, dict[int, float]],
    round_: int = 1,
) -> list[BenchRow]:
    """Rows of one round as bench would return them: tokens/s per concurrency."""
    rows = [
        make_row(NO_SPEC, c, tps, speculative=None, round_=round_) for c, tps in baseline.items()
    ]
    rows += [
        make_row(tune.candidate_name(spec), c, tps, speculative=spec, round_=round_)
        for spec, levels in candidates.items()
        for c, tps in levels.items()
    ]
    return rows


def test_candidates_cover_k_windows_and_the_profiles_draft() -> None:
    cpu = tune.candidates(load_profile("cpu"), [2, 5], [(1, 3), (2, 5)])
    assert [c.label for c in cpu] == [
        "ngram-k2-n1-3",
        "ngram-k5-n1-3",
        "ngram-k2-n2-5",
        "ngram-k5-n2-5",
    ]
    draft_profile = load_profile("cpu-draft")
    draft = tune.candidates(draft_profile, [2, 5], [(2, 5)])
    assert [c.label for c in draft] == [
        "ngram-k2-n2-5",
        "ngram-k5-n2-5",
        "draft_model-k2",
        "draft_model-k5",
    ]
    spec = draft[-1].profile.speculative
    assert spec is not None
    assert spec.model == draft_profile.speculative.model  # type: ignore[union-attr]
    assert all(c.profile.engine == draft_profile.engine for c in draft)


def test_split_holds_out_prompts_spread_over_the_list() -> None:
    cases = load_cases(categories={"rag"}, limit=8)
    tuning, validation = tune.split_cases(cases, 0.5)
    assert [c.id for c in validation] == [c.id for c in cases[1::2]]
    assert [c.id for c in tuning] == [c.id for c in cases[::2]]
    tuning, validation = tune.split_cases(cases, 0.25)
    assert (len(tuning), len(validation)) == (6, 2)
    assert not {c.id for c in tuning} & {c.id for c in validation}
    with pytest.raises(ValueError, match="empty validation set"):
        tune.split_cases(cases[:1], 0.5)


@pytest.mark.parametrize(
    ("levels", "max_num_seqs", "expected"),
    [
        ({1: 5, 4: 3, 16: 0}, 16, ((1, 2, 5), (3, 8, 3), (9, 16, 0))),
        ({1: 5, 4: 5, 16: 0}, 16, ((1, 8, 5), (9, 16, 0))),  # equal neighbours merge
        (
            {1: 5, 2: 3, 4: 2, 8: 1, 16: 0},
            16,
            ((1, 1, 5), (2, 2, 3), (3, 5, 2), (6, 11, 1), (12, 16, 0)),
        ),
        ({4: 3}, 64, ((1, 64, 3),)),
        ({1: 5, 32: 0}, 16, ((1, 5, 5), (6, 16, 0))),  # a level past max_num_seqs
        ({1: 5, 4: 3, 16: 0}, 2, ((1, 2, 5),)),
    ],
)
def test_batch_schedule(
    levels: dict[int, int], max_num_seqs: int, expected: tuple[tuple[int, int, int], ...]
) -> None:
    assert tune.batch_schedule(levels, max_num_seqs) == expected


def test_choose_picks_the_family_and_the_best_k_per_level() -> None:
    rows = measured(
        {1: 50.0, 4: 120.0, 16: 200.0},
        {
            # k=5 wins alone, k=3 under load, nothing beats no speculation at 16.
            ngram(3): {1: 80.0, 4: 150.0, 16: 190.0},
            ngram(5): {1: 100.0, 4: 130.0, 16: 180.0},
            # Another window: better at 16 but worse overall.
            ngram(5, 1, 3): {1: 60.0, 4: 121.0, 16: 210.0},
        },
    )
    # A second round under load: the paired speedups are the same, the choice too.
    rows += [r.model_copy(update={"round": 2, "wall_s": r.wall_s * 2}) for r in rows]
    # A lever variant's rows do not take part in the choice.
    rows.append(make_row("ngram-k3-n2-5", 16, 1000.0, speculative=ngram(3), variant="bind=0-1"))
    choice = tune.choose(rows, max_num_seqs=16)
    assert [(lv.concurrency, lv.num_speculative_tokens) for lv in choice.levels] == [
        (1, 5),
        (4, 3),
        (16, 0),
    ]
    assert choice.levels[2].best_speedup == pytest.approx(0.95)
    assert choice.expected_speedup == pytest.approx((2.0 + 1.25 + 1.0) / 3)
    assert choice.speculative == ngram(5).model_copy(
        update={"num_speculative_tokens_per_batch_size": ((1, 2, 5), (3, 8, 3), (9, 16, 0))}
    )


def test_choose_turns_speculation_off_when_it_never_pays() -> None:
    rows = measured({1: 100.0, 16: 200.0}, {ngram(3): {1: 90.0, 16: 150.0}})
    choice = tune.choose(rows, max_num_seqs=16)
    assert choice.speculative is None
    assert [lv.num_speculative_tokens for lv in choice.levels] == [0, 0]
    assert choice.expected_speedup == 1.0


def test_choose_needs_a_baseline_under_the_workload() -> None:
    with pytest.raises(ValueError, match="baseline"):
        tune.choose([make_row("cpu", 1)], max_num_seqs=16)
    rows = measured({1: 100.0}, {ngram(3): {1: 200.0}})
    with pytest.raises(ValueError, match="baseline"):
        tune.choose(rows, max_num_seqs=16, workload="sampling")


def test_levers_are_measured_with_and_without_speculation() -> None:
    levers = tune.variants([512], ["0-1:0"])
    assert [(v.name, v.engine, v.env) for v in levers] == [
        ("batched-tokens=512", {"max_num_batched_tokens": 512}, {}),
        (
            "bind=0-1 reserved=0",
            {},
            {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
        ),
    ]
    targets = tune.tuning_targets(load_profile("cpu"), [3], [(2, 5)], levers)
    assert [(t.config.config, t.config.variant) for t in targets] == [
        (NO_SPEC, ""),
        ("ngram-k3-n2-5", ""),
        (NO_SPEC, "batched-tokens=512"),
        ("cpu", "batched-tokens=512"),
        (NO_SPEC, "bind=0-1 reserved=0"),
        ("cpu", "bind=0-1 reserved=0"),
    ]
    assert targets[3].setup["engine_args"]["max_num_batched_tokens"] == 512
    assert targets[5].setup["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_lever_table_compares_with_the_profile_settings() -> None:
    rows = [
        make_row(NO_SPEC, 1, 50.0, speculative=None),
        make_row("cpu", 1, 100.0),
        make_row(NO_SPEC, 1, 55.0, speculative=None, variant="bind=0-1 reserved=0"),
        make_row("cpu", 1, 90.0, variant="bind=0-1 reserved=0"),
    ]
    lines = tune.lever_table(rows, "cpu").splitlines()
    assert lines[2:] == [
        "| bind=0-1 reserved=0 | no-spec | 1 | 55.0 | 1.10 |",
        "| bind=0-1 reserved=0 | cpu | 1 | 90.0 | 0.90 |",
    ]


def test_validation_verdict() -> None:
    rows = [
        make_row(NO_SPEC, 1, 50.0, speculative=None),
        make_row("cpu", 1, 90.0),
        make_row(tune.TUNED, 1, 100.0),
        make_row(NO_SPEC, 4, 100.0, speculative=None),
        make_row("cpu", 4, 95.0),
        make_row(tune.TUNED, 4, 105.0),
    ]
    result = tune.validation_result(rows, "cpu", "greedy")
    assert result.tuned == {1: pytest.approx(2.0), 4: pytest.approx(1.05)}
    assert result.current == {1: pytest.approx(1.8), 4: pytest.approx(0.95)}
    assert result.wins
    # No tuned rows: the tuned profile is the baseline, 1x everywhere.
    baseline_only = tune.validation_result(rows[:2] + rows[3:5], "cpu", "greedy")
    assert baseline_only.tuned == {1: 1.0, 4: 1.0}
    assert not baseline_only.wins


@pytest.mark.parametrize("speculates", [True, False])
def test_tuned_profile_yaml_loads_back(tmp_path: Path, speculates: bool) -> None:
    cpu = load_profile("cpu")
    rows = measured(
        {1: 50.0, 4: 100.0, 16: 200.0},
        {ngram(5): {1: 100.0 if speculates else 40.0, 4: 90.0, 16: 150.0}},
    )
    choice = tune.choose(rows, cpu.engine.max_num_seqs)
    path = tmp_path / "cpu-tuned.yaml"
    tuned = cpu.with_speculative(choice.speculative).model_copy(update={"name": path.stem})
    path.write_text(profile_yaml(tuned, "measured here\nsecond line"))
    loaded = load_profile_file(path)
    assert loaded == tuned
    assert (loaded.model, loaded.engine, loaded.serving) == (cpu.model, cpu.engine, cpu.serving)
    assert path.read_text().startswith("# measured here\n# second line\n")
    if speculates:
        assert loaded.speculative is not None
        assert loaded.speculative.num_speculative_tokens == 5
        assert loaded.speculative.num_speculative_tokens_per_batch_size == ((1, 2, 5), (3, 16, 0))
        assert "[1, 2, 5]" in path.read_text()  # schedule steps on one line
    else:
        assert loaded.speculative is None


def test_window_list() -> None:
    assert tune_cli.window_list("1:3,2:5") == [(1, 3), (2, 5)]
    for bad in ("3", "3:1", "a:b", "0:2"):
        with pytest.raises(argparse.ArgumentTypeError, match="MIN"):
            tune_cli.window_list(bad)


@pytest.mark.engine
def test_tune_command_tunes_then_validates_on_other_prompts(tmp_path: Path) -> None:
    """One real, short run: no-spec and one ngram candidate on two prompts, then no-spec, the
    cpu profile and the tuned profile on two others."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(case.model_dump_json() + "\n" for case in load_cases(categories={"rag"}, limit=4))
    )
    out = tmp_path / "cpu-tuned.yaml"
    command = [
        *(sys.executable, "-m", "bentospec.cli", "tune", "--profile", "cpu"),
        *("--prompts", str(prompts), "--out", str(out), "--k", "3", "--windows", "2:5"),
        *("--concurrency", "1,2", "--max-tokens", "16", "--validation-rounds", "1"),
        *("--requests-per-slot", "2", "--prompt-reuse", "repeated"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    tuned = load_profile_file(out)
    cpu = load_profile("cpu")
    assert (tuned.name, tuned.model, tuned.engine) == ("cpu-tuned", cpu.model, cpu.engine)
    if tuned.speculative is not None:
        # Measured here: this CPU class's schedule, k=3 at most; other classes keep cpu's.
        assert tuned.speculative.method == "ngram"
        host_class = cpu.hardware.host_class()
        steps = tuned.speculative.schedule_for(host_class)
        assert steps is not None and steps[0][0] == 1 and steps[-1][1] == cpu.engine.max_num_seqs
        assert max(k for _, _, k in steps) <= 3 < tuned.speculative.num_speculative_tokens
        assert cpu.speculative is not None
        others = [c for c in HOST_CLASSES if c != host_class]
        assert all(
            tuned.speculative.schedule_for(c) == cpu.speculative.schedule_for(c) for c in others
        )
    report = json.loads(out.with_suffix(".json").read_text())
    tuning_ids, validation_ids = report["tuning"]["prompt_ids"], report["validation"]["prompt_ids"]
    assert len(tuning_ids) == len(validation_ids) == 2
    assert not set(tuning_ids) & set(validation_ids)
    assert {(r["config"], r["concurrency"]) for r in report["tuning"]["rows"]} == {
        (config, level) for config in (NO_SPEC, "ngram-k3-n2-5") for level in (1, 2)
    }
    validated = {r["config"] for r in report["validation"]["rows"]}
    assert {NO_SPEC, "cpu"} <= validated
    # Validated only where tuning chose to draft. On a CPU host "no candidate paid" keeps the
    # profile's speculation for the other classes and writes k=0 at every size for this one.
    spec, host_class = tuned.speculative, cpu.hardware.host_class()
    host_schedule = spec.schedule_for(host_class) if spec is not None else None
    drafts = spec is not None and (host_schedule is None or any(k for _, _, k in host_schedule))
    if spec is not None and not drafts:
        assert host_schedule == ((1, cpu.engine.max_num_seqs, 0),)
    assert (tune.TUNED in validated) == drafts
    assert "on validation" in result.stdout


def test_tune_command_reproduces_the_arguments(tmp_path: Path) -> None:
    argv = [
        *("tune", "--profile", "cpu", "--out", str(tmp_path / "t.yaml"), "--categories", "rag"),
        *("--num-prompts", "6", "--k", "2,5", "--windows", "1:3", "--batched-tokens", "256"),
        *("--bind", "0:1", "--concurrency", "1,4", "--rounds", "2", "--validation-rounds", "3"),
    ]
    args = build_parser().parse_args(argv)
    settings = tune_cli._settings(args, args.rounds, args.out)
    command = tune_command(settings, args, args.out)
    assert vars(build_parser().parse_args(shlex.split(command)[1:])) == vars(args)
