"""The committed prompt dataset (``bentospec/data/prompts.jsonl``) used by bench, tune, verify.

Each case is a query with optional documents; it becomes a prompt through ``prompts/`` and the
model's chat template, exactly as an OPEA request would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from bentospec.prompts import PromptTemplates, chat_prompt

DEFAULT_DATASET = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
#: Large pools of distinct prompts (:mod:`bentospec.pool_build`): ``bentospec tune`` tunes on
#: the first, ``bentospec bench`` reports on the second.
TUNE_POOL = DEFAULT_DATASET.with_name("pool-tune.jsonl")
HELDOUT_POOL = DEFAULT_DATASET.with_name("pool-heldout.jsonl")

Category = Literal["chat", "code", "math", "rag", "summarization"]


class PromptCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    category: Category
    query: str
    documents: tuple[str, ...] = ()


def load_cases(
    path: Path | None = None, categories: set[str] | None = None, limit: int | None = None
) -> list[PromptCase]:
    """Cases of a JSONL file, optionally filtered by category and cut to ``limit``."""
    path = path or DEFAULT_DATASET
    cases = [
        PromptCase.model_validate_json(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if categories:
        cases = [c for c in cases if c.category in categories]
    return cases[:limit] if limit is not None else cases


def render_cases(
    cases: list[PromptCase], tokenizer: object, templates: PromptTemplates | None = None
) -> list[str]:
    templates = templates or PromptTemplates()
    return [chat_prompt(tokenizer, templates.question(c.query, list(c.documents))) for c in cases]
