"""Every environment variable bentospec reads, with its type, default and meaning.

In the spirit of vLLM's ``envs.py``: one declaration per variable, read through
:meth:`Variable.get` when it is used (never at import), so that a test's or a launcher's
change to the environment takes effect. The README's table of variables is
:func:`markdown_table` (``python -m bentospec.settings`` prints it; a test keeps the two equal).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

#: The checkout (or installed tree) holding ``configs/``, ``prompts/`` and ``service.py``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variable(Generic[T]):
    """One environment variable: unset or empty means ``default``."""

    name: str
    parse: Callable[[str], T]
    default: T
    doc: str
    #: How the README shows the default, where its value depends on the machine.
    shown_default: str | None = None

    def get(self, environ: Mapping[str, str] = os.environ) -> T:
        raw = environ.get(self.name)
        return self.parse(raw) if raw else self.default


def _path(text: str) -> Path:
    return Path(text).expanduser()


PROFILE: Variable[str | None] = Variable(
    "BENTOSPEC_PROFILE",
    str,
    None,
    "Profile to serve when `bentoml serve` gets no `--arg profile=NAME`; unset: detected "
    "from the GPUs (none: `cpu`).",
)
CONFIG_DIR: Variable[Path] = Variable(
    "BENTOSPEC_CONFIG_DIR",
    _path,
    PROJECT_ROOT / "configs",
    "The profile catalogue (one YAML file per profile): tests and custom catalogues.",
    shown_default="`configs/`",
)
PROMPT_DIR: Variable[Path] = Variable(
    "BENTOSPEC_PROMPT_DIR",
    _path,
    PROJECT_ROOT / "prompts",
    "The OPEA prompt templates (`rag.jinja`, `plain.jinja`).",
    shown_default="`prompts/`",
)
CACHE: Variable[Path] = Variable(
    "BENTOSPEC_CACHE",
    _path,
    Path.home() / ".cache" / "bentospec",
    "Where the embedded models are built once (and kept) before `bentospec models prepare` "
    "stores them in BentoML's model store; a stored model or a Bento's own never needs it.",
    shown_default="`~/.cache/bentospec`",
)
API_KEY: Variable[str] = Variable(
    "BENTOSPEC_API_KEY",
    str,
    "",
    "Set: every route but `/livez`, `/readyz`, `/healthz` and `/metrics` needs "
    "`Authorization: Bearer <key>`; the benchmark's clients send it.",
)
ENFORCE_EAGER: Variable[bool] = Variable(
    "BENTOSPEC_ENFORCE_EAGER",
    lambda text: text == "1",
    False,
    "`1` runs every engine without torch.compile, whatever the profile says: ~37 s per start "
    "instead of a first compile of ~130 s, for ~11% slower decoding (the test suite sets it).",
)
CPU_PRELOAD: Variable[str] = Variable(
    "BENTOSPEC_CPU_PRELOAD",
    str,
    "auto",
    "`auto`: the engine core preloads Intel OpenMP and tcmalloc where found (vLLM's CPU "
    "install guide); `off`: vLLM's own choice (GNU OpenMP, glibc malloc).",
)
CPU_RESERVED_BIND: Variable[str] = Variable(
    "BENTOSPEC_CPU_RESERVED_BIND",
    str,
    "on",
    "`on`: the engine core and the API process run on the cores vLLM's CPU worker is not bound "
    "to (vLLM reserves them but binds nothing there); `off`: wherever the kernel puts them.",
)
CPU_DRAFTS: Variable[str] = Variable(
    "BENTOSPEC_CPU_DRAFTS",
    str,
    "carried",
    "`carried`: a speculative CPU engine's drafts come back with each step's sampled tokens; "
    "`rpc`: in a round trip of their own after every step, as vLLM does.",
)
CPU_SHM_SPIN: Variable[float | None] = Variable(
    "BENTOSPEC_CPU_SHM_SPIN",
    float,
    None,
    "Seconds a vLLM CPU process spins (`sched_yield`) on its shared-memory queue after a "
    "message before it sleeps until the next one is signalled; unset: vLLM's 1 s; `0`: sleep "
    "at once, leaving the core to the worker and the API process.",
)
CPU_WIDE_STEP_TOKENS: Variable[int] = Variable(
    "BENTOSPEC_CPU_WIDE_STEP_TOKENS",
    int,
    1,
    "A CPU engine step scheduling at least this many tokens runs its forward pass with one more "
    "OpenMP thread on each core vLLM reserves (`1`: every step; `64`: prefills); `0`: vLLM's "
    "threads for every step.",
)
HF_TOKEN: Variable[str | None] = Variable(
    "HF_TOKEN",
    str,
    None,
    "Hugging Face token for hub-backed (gated) models; never logged, declared without a value "
    "in a Bento of a hub-backed profile.",
)
FUZZ_EXAMPLES: Variable[int | None] = Variable(
    "BENTOSPEC_FUZZ_EXAMPLES",
    int,
    None,
    "Tests: N random examples per fuzzing test instead of CI's fixed, seeded run.",
)
FUZZ_DATABASE: Variable[Path | None] = Variable(
    "BENTOSPEC_FUZZ_DATABASE",
    _path,
    None,
    "Tests, with `BENTOSPEC_FUZZ_EXAMPLES`: where failing examples are kept and replayed "
    "first (unset: hypothesis' `.hypothesis/`).",
)

VARIABLES: tuple[Variable[object], ...] = (
    PROFILE,
    CONFIG_DIR,
    PROMPT_DIR,
    CACHE,
    API_KEY,
    ENFORCE_EAGER,
    CPU_PRELOAD,
    CPU_RESERVED_BIND,
    CPU_DRAFTS,
    CPU_SHM_SPIN,
    CPU_WIDE_STEP_TOKENS,
    HF_TOKEN,
    FUZZ_EXAMPLES,
    FUZZ_DATABASE,
)


def markdown_table() -> str:
    """The README's table of environment variables."""
    rows = ["| variable | default | what |", "| :--- | :--- | :--- |"]
    for var in VARIABLES:
        default = var.shown_default or ("unset" if var.default in (None, "", False) else None)
        rows.append(f"| `{var.name}` | {default or f'`{var.default}`'} | {var.doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
