"""Which class of CPU this is: what a speculative verify step costs depends on it.

On 2 cores, a step verifying 5 drafts (a 6-row GEMM) costs about 1.5x a plain step in float32
on an AVX2-only CPU, but about 1.15x in bf16 on AMX (docs/benchmarks.md): the same profile
needs a different schedule on each. CPU profiles name a schedule per class
(``SpeculativeSpec.host_schedules``) and the engine takes the one for the class found here.
Read from ``/proc/cpuinfo``, which needs no torch or vLLM import, so ``profiles show`` and the
benchmark's provenance can say it too.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

#: Classes by their fastest matrix unit: ``amx`` (AMX bf16 tiles), ``avx512`` (AVX-512),
#: ``avx2`` (AVX2 only), ``other`` (older x86, ARM, anything else).
HostClass = Literal["amx", "avx512", "avx2", "other"]
HOST_CLASSES: tuple[HostClass, ...] = ("amx", "avx512", "avx2", "other")

_CPUINFO = Path("/proc/cpuinfo")


class CpuHost(BaseModel):
    """The CPU model and its class, as the benchmark records them."""

    #: ``model name`` of ``/proc/cpuinfo`` (``AMD EPYC``), else what Python's platform says.
    model: str
    host_class: HostClass


def host_class_of(flags: set[str]) -> HostClass:
    """The class of a CPU with these ``/proc/cpuinfo`` flags."""
    if "amx_bf16" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def parse_cpuinfo(text: str) -> CpuHost:
    """The first processor's model name and flags of a ``/proc/cpuinfo`` text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the blank line after the first processor
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    return CpuHost(
        model=fields.get("model name") or platform.processor() or platform.machine(),
        host_class=host_class_of(set(fields.get("flags", "").split())),
    )


@functools.cache
def detect_cpu_host() -> CpuHost:
    """This machine's CPU (read once: it does not change while a process runs)."""
    try:
        return parse_cpuinfo(_CPUINFO.read_text())
    except OSError:
        return CpuHost(model=platform.processor() or platform.machine(), host_class="other")
