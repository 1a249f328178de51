"""CPU class detection from /proc/cpuinfo, and the schedule a CPU profile takes for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bentospec import engine_args, tune
from bentospec.cpu_host import HOST_CLASSES, detect_cpu_host, parse_cpuinfo
from bentospec.profile import (
    Profile,
    ProfileError,
    SpeculativeSpec,
    load_profile,
    load_profile_file,
)
from tests.conftest import CATALOGUE_DIR

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse sse2 {flags}

processor\t: 1
model name\t: second processor
flags\t\t: fpu
"""


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "amx"),
        ("avx avx2 avx512f avx512bw", "avx512"),
        ("avx avx2 fma", "avx2"),
        ("avx", "other"),
    ],
)
def test_class_from_the_first_processors_flags(flags: str, expected: str) -> None:
    host = parse_cpuinfo(CPUINFO.format(vendor="v", model="Some CPU", flags=flags))
    assert (host.model, host.host_class) == ("Some CPU", expected)


def test_this_machine_has_a_class() -> None:
    host = detect_cpu_host()
    assert host.host_class in HOST_CLASSES and host.model


def ngram(**changes: object) -> SpeculativeSpec:
    return SpeculativeSpec.model_validate(
        {
            "method": "ngram",
            "num_speculative_tokens": 8,
            "prompt_lookup_min": 2,
            "prompt_lookup_max": 5,
            **changes,
        }
    )


def test_each_class_takes_its_schedule_and_the_rest_the_default() -> None:
    spec = ngram(
        num_speculative_tokens_per_batch_size=[[1, 16, 5]],
        host_schedules={"avx2": [[1, 2, 8], [3, 16, 0]]},
    )
    config = engine_args.speculative_config(spec, None, "avx2")
    assert config is not None and config["num_speculative_tokens_per_batch_size"] == [
        [1, 2, 8],
        [3, 16, 0],
    ]
    assert "host_schedules" not in config
    other = engine_args.speculative_config(spec, None, "amx")
    assert other is not None and other["num_speculative_tokens_per_batch_size"] == [[1, 16, 5]]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"host_schedules": {"avx2": [[1, 2, 8], [4, 16, 0]]}}, r"host_schedules\.avx2 must cover"),
        ({"host_schedules": {"avx2": [[1, 16, 9]]}}, r"host_schedules\.avx2 asks for 9 tokens"),
        ({"host_schedules": {"sse": [[1, 16, 1]]}}, "host_schedules.sse"),
    ],
)
def test_class_schedules_are_checked_like_the_default(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ngram(**changes)


def test_a_cuda_profile_takes_no_class_schedules() -> None:
    gpu = load_profile("l4-24gb")
    assert gpu.speculative is not None
    data = gpu.model_dump()
    data["speculative"]["host_schedules"] = {"avx2": [[1, 16, 1]]}
    with pytest.raises(ValueError, match="chosen by CPU class"):
        Profile.model_validate(data)


def test_the_cpu_profile_names_a_schedule_for_this_class_or_the_default() -> None:
    spec = load_profile("cpu").speculative
    assert spec is not None
    chosen = spec.schedule_for(detect_cpu_host().host_class)
    assert chosen is None or chosen[-1][1] == load_profile("cpu").engine.max_num_seqs


# --- tune writes what it measured as this class's schedule --------------------------------


def test_tuned_schedule_goes_to_the_class_it_was_measured_on() -> None:
    current = ngram(num_speculative_tokens=5)
    chosen = ngram(num_speculative_tokens_per_batch_size=[[1, 2, 8], [3, 8, 3], [9, 16, 0]])
    tuned = tune.for_host_class(current, chosen, "avx2", 16)
    assert tuned is not None
    assert tuned.num_speculative_tokens == 8
    assert tuned.host_schedules == {"avx2": ((1, 2, 8), (3, 8, 3), (9, 16, 0))}
    # Other classes keep k=5 although the maximum rose to 8.
    assert tuned.schedule_for("amx") == ((1, 16, 5),)


def test_no_paying_candidate_turns_speculation_off_on_this_class_only() -> None:
    current = ngram(num_speculative_tokens=5, host_schedules={"amx": [[1, 16, 5]]})
    tuned = tune.for_host_class(current, None, "avx2", 16)
    assert tuned is not None and tuned.host_schedules == {
        "amx": ((1, 16, 5),),
        "avx2": ((1, 16, 0),),
    }
    assert tuned.num_speculative_tokens_per_batch_size is None


def test_another_family_replaces_the_spec_for_every_class() -> None:
    current = ngram(num_speculative_tokens=5)
    chosen = ngram(prompt_lookup_min=1, prompt_lookup_max=3)
    assert tune.for_host_class(current, chosen, "avx2", 16) == chosen
    assert tune.for_host_class(None, chosen, "avx2", 16) == chosen


def test_profile_error_names_the_file_and_the_class_key(tmp_path: Path) -> None:
    text = (CATALOGUE_DIR / "cpu.yaml").read_text()
    bad = "  host_schedules:\n    avx2: [[2, 16, 1]]\nengine:\n"
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("engine:\n", bad, 1))
    with pytest.raises(ProfileError, match=r"bad\.yaml: speculative: .*host_schedules\.avx2"):
        load_profile_file(path)


@pytest.mark.slow
def test_profiles_show_names_the_class_dtype_and_schedule_here() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bentospec.cli", "profiles", "show", "cpu"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = detect_cpu_host()
    kwargs = json.loads(result.stdout)
    assert f"# this CPU: {host.model}, class {host.host_class}: dtype {kwargs['dtype']}" in (
        result.stderr
    )
    spec = load_profile("cpu").speculative
    assert spec is not None
    schedule = spec.schedule_for(host.host_class)
    assert kwargs["speculative_config"].get("num_speculative_tokens_per_batch_size") == (
        None if schedule is None else [list(step) for step in schedule]
    )


def test_lossless_checks_draft_at_every_batch_size() -> None:
    cpu = load_profile("cpu")
    drafting = cpu.drafting_at_every_batch_size()
    assert drafting.speculative is not None and cpu.speculative is not None
    assert drafting.speculative.schedule_for(detect_cpu_host().host_class) is None
    assert drafting.speculative.num_speculative_tokens == cpu.speculative.num_speculative_tokens
    assert load_profile("cpu-nospec").drafting_at_every_batch_size().speculative is None
