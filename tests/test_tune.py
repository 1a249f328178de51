"""Autotuner: candidates, the choice and schedule from given measurements, the profile it
writes, and one short real run of ``bentospec tune``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bentospec import bench, tune
from bentospec.dataset import load_cases
from bentospec.profile import SpeculativeSpec, load_profile, load_profile_file
from tests.test_bench import make_row

ROOT = Path(__file__).resolve().parent.parent


def ngram(k: int, lo: int = 2, hi: int = 5) -> SpeculativeSpec:
    return SpeculativeSpec(
        method="ngram", num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi
    )


def measured(
    baseline: dict[int, float], candidates: dict[SpeculativeSpec, dict[int, float]]
) -> list[bench.BenchRow]:
    """Rows as bench would return them: tokens/s per concurrency, speedups filled in."""
    rows = [make_row(bench.NO_SPEC, c, tps, speculative=None) for c, tps in baseline.items()]
    rows += [
        make_row(tune.candidate_name(spec), c, tps, speculative=spec)
        for spec, levels in candidates.items()
        for c, tps in levels.items()
    ]
    return bench.with_speedups(rows)


def test_candidates_cover_k_windows_and_the_profiles_draft() -> None:
    cpu = tune.candidates(load_profile("cpu"), [2, 5], [(1, 3), (2, 5)])
    assert [p.name for p in cpu] == [
        "ngram-k2-n1-3",
        "ngram-k5-n1-3",
        "ngram-k2-n2-5",
        "ngram-k5-n2-5",
    ]
    draft_profile = load_profile("cpu-draft")
    draft = tune.candidates(draft_profile, [2, 5], [(2, 5)])
    assert [p.name for p in draft] == [
        "ngram-k2-n2-5",
        "ngram-k5-n2-5",
        "draft_model-k2",
        "draft_model-k5",
    ]
    assert draft[-1].speculative is not None
    assert draft[-1].speculative.model == draft_profile.speculative.model  # type: ignore[union-attr]
    assert all(p.engine == draft_profile.engine for p in draft)


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


def test_choose_needs_a_baseline() -> None:
    with pytest.raises(ValueError, match="baseline"):
        tune.choose([make_row("cpu", 1)], max_num_seqs=16)


@pytest.mark.parametrize("speculates", [True, False])
def test_tuned_profile_yaml_loads_back(tmp_path: Path, speculates: bool) -> None:
    cpu = load_profile("cpu")
    rows = measured(
        {1: 50.0, 4: 100.0, 16: 200.0},
        {ngram(5): {1: 100.0 if speculates else 40.0, 4: 90.0, 16: 150.0}},
    )
    choice = tune.choose(rows, cpu.engine.max_num_seqs)
    path = tmp_path / "cpu-tuned.yaml"
    tuned = tune.tuned_profile(cpu, choice, path.stem, "mine.jsonl")
    path.write_text(tune.profile_yaml(tuned, "measured here\n" + tune.levels_table(choice)))
    loaded = load_profile_file(path)
    assert loaded == tuned
    assert loaded.name == "cpu-tuned"
    assert (loaded.model, loaded.engine, loaded.serving) == (cpu.model, cpu.engine, cpu.serving)
    assert path.read_text().startswith("# measured here\n# | concurrency |")
    if speculates:
        assert loaded.speculative is not None
        assert loaded.speculative.num_speculative_tokens == 5
        assert loaded.speculative.num_speculative_tokens_per_batch_size == ((1, 2, 5), (3, 16, 0))
        assert "ngram k=5 n=2..5" in loaded.description
    else:
        assert loaded.speculative is None


def test_window_list() -> None:
    assert tune.window_list("1:3,2:5") == [(1, 3), (2, 5)]
    for bad in ("3", "3:1", "a:b", "0:2"):
        with pytest.raises(argparse.ArgumentTypeError, match="MIN"):
            tune.window_list(bad)


@pytest.mark.engine
def test_tune_command_writes_a_loadable_profile(tmp_path: Path) -> None:
    """One real, short run: the no-spec baseline and one ngram candidate on the cpu profile."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(case.model_dump_json() + "\n" for case in load_cases(categories={"rag"}, limit=3))
    )
    out = tmp_path / "cpu-tuned.yaml"
    command = [
        *(sys.executable, "-m", "bentospec.cli", "tune", "--profile", "cpu"),
        *("--prompts", str(prompts), "--out", str(out), "--k", "3", "--windows", "2:5"),
        *("--concurrency", "1,2", "--max-tokens", "16"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    tuned = load_profile_file(out)
    cpu = load_profile("cpu")
    assert (tuned.name, tuned.model, tuned.engine) == ("cpu-tuned", cpu.model, cpu.engine)
    if tuned.speculative is not None:
        assert tuned.speculative.method == "ngram"
        assert tuned.speculative.num_speculative_tokens == 3
        steps = tuned.speculative.num_speculative_tokens_per_batch_size
        assert steps is not None and steps[0][0] == 1 and steps[-1][1] == cpu.engine.max_num_seqs
    report = json.loads(out.with_suffix(".json").read_text())
    assert {(r["config"], r["concurrency"]) for r in report["rows"]} == {
        (bench.NO_SPEC, 1),
        (bench.NO_SPEC, 2),
        ("ngram-k3-n2-5", 1),
        ("ngram-k3-n2-5", 2),
    }
    assert "chosen:" in result.stdout
