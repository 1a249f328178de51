"""The command lines that reproduce a run, written into its report: ``bentospec bench`` and
``bentospec tune``, with the options spelled as their parsers take them."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from bentospec.bench.records import BenchSettings
from bentospec.dataset import DEFAULT_DATASET
from bentospec.settings import PROJECT_ROOT


def load_options(settings: BenchSettings) -> list[str]:
    """The prompt and load options both commands share
    (:func:`bentospec.bench.cli.add_load_arguments`), but ``--rounds``."""
    args: list[str] = []
    # None: results written while the committed dataset was the default.
    args += ["--prompts", settings.prompts or str(DEFAULT_DATASET.relative_to(PROJECT_ROOT))]
    args += ["--prompt-reuse", settings.prompt_reuse]
    if settings.categories:
        args += ["--categories", *settings.categories]
    if settings.num_prompts is not None:
        args += ["--num-prompts", str(settings.num_prompts)]
    args += ["--max-tokens", str(settings.max_tokens)]
    args += ["--concurrency", ",".join(map(str, settings.concurrency))]
    args += ["--requests-per-slot", str(settings.requests_per_slot)]
    return [*args, "--workloads", ",".join(settings.workloads)]


def bench_command(settings: BenchSettings) -> str:
    args = ["bentospec", "bench"]
    for name in settings.profiles:
        args += ["--profile", name]
    args += [*load_options(settings), "--rounds", str(settings.rounds)]
    args += ["--url", settings.url] if settings.url is not None else []
    args += ["--peer"] if settings.peer else []
    args += ["--servers"] if settings.servers else []
    args += ["--restart-servers"] if settings.restart_servers else []
    args += ["--compare-service"] if settings.compare_service else []
    for label, env in settings.server_env.items():
        args += ["--server-env", f"{label}:" + ",".join(f"{k}={v}" for k, v in env.items())]
    return shlex.join([*args, "--out", settings.out])


def tune_command(settings: BenchSettings, args: argparse.Namespace, out: Path) -> str:
    """``bentospec tune`` with the tuning run's ``settings`` and tune's own options in ``args``."""
    batched = ",".join(map(str, args.batched_tokens))
    tune_options = [
        *("--validation-fraction", f"{args.validation_fraction:g}"),
        *("--k", ",".join(map(str, args.k))),
        *("--windows", ",".join(f"{lo}:{hi}" for lo, hi in args.windows)),
        *(["--batched-tokens", batched] if batched else []),
        *(arg for bind in args.bind for arg in ("--bind", bind)),
    ]
    rounds = ["--rounds", str(settings.rounds), "--validation-rounds", str(args.validation_rounds)]
    profile = ["--profile", *settings.profiles, "--out", str(out)]
    load = load_options(settings)
    return shlex.join(["bentospec", "tune", *profile, *load, *tune_options, *rounds])
