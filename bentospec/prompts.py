"""Prompt templates from ``prompts/``, rendered with Jinja and the model's chat template.

Templates build the *user message*; the model's own chat template (from its tokenizer) then
wraps it, so one template serves every model a profile may name.
"""

from __future__ import annotations

import os
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

DEFAULT_PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"


def prompt_dir() -> Path:
    return Path(os.environ.get("BENTOSPEC_PROMPT_DIR") or DEFAULT_PROMPT_DIR)


class PromptTemplates:
    """The templates of one prompt directory; ``StrictUndefined`` makes a missing variable fail."""

    def __init__(self, directory: Path | None = None) -> None:
        self._env = Environment(
            loader=FileSystemLoader(directory or prompt_dir()),
            undefined=StrictUndefined,
            autoescape=select_autoescape(default=False, default_for_string=False),
            keep_trailing_newline=False,
        )

    def render(self, name: str, **variables: object) -> str:
        return self._env.get_template(f"{name}.jinja").render(**variables).strip()

    def question(self, query: str, documents: list[str]) -> str:
        """The user message for a query: the RAG template with documents, the plain one without."""
        if documents:
            return self.render("rag", query=query, documents=documents)
        return self.render("plain", query=query)


def chat_prompt(tokenizer: object, message: str) -> str:
    """``message`` as a user turn in the model's chat template, ready for generation."""
    return tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
