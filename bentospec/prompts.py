"""Prompt templates from ``prompts/``, rendered with Jinja and the model's chat template.

Templates build the *user message*; the model's own chat template (from its tokenizer) then
wraps it, so one template serves every model a profile may name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from bentospec import settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PromptTemplates:
    """The templates of one prompt directory; ``StrictUndefined`` makes a missing variable fail."""

    def __init__(self, directory: Path | None = None) -> None:
        self._env = Environment(
            loader=FileSystemLoader(directory or settings.PROMPT_DIR.get()),
            undefined=StrictUndefined,
            autoescape=select_autoescape(default=False, default_for_string=False),
            keep_trailing_newline=False,
        )

    def render(self, name: str, **variables: object) -> str:
        return self._env.get_template(f"{name}.jinja").render(**variables).strip()

    def question(self, query: str, documents: list[str], template: str | None = None) -> str:
        """The user message for a query: the RAG template with documents, the plain one without.

        ``template`` is an OPEA ``chat_template`` (``{question}``, ``{context}`` placeholders).
        """
        if template is not None:
            return fill_placeholders(template, question=query, context="\n".join(documents))
        if documents:
            return self.render("rag", query=query, documents=documents)
        return self.render("plain", query=query)


_PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")


def fill_placeholders(template: str, **values: str) -> str:
    """Replace ``{name}`` placeholders in one pass, as OPEA fills its ``chat_template``.

    Unlike ``str.format``, text inside the values is never expanded again and no attribute or
    index lookups run, so client-supplied templates and documents stay plain text.
    """
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def chat_prompt(tokenizer: object, message: str) -> str:
    """``message`` as a user turn in the model's chat template, ready for generation."""
    return tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


#: Stands in for the user message while the chat template renders around it.
_MESSAGE_SLOT = "\ue000bentospec-user-message\ue000"


class ChatEncoder:
    """Token ids of a user message inside the model's chat template, for untrusted text.

    Rendering the message into the template and tokenizing the result would turn any
    ``<|im_start|>`` the message (a RAG document, a query) contains into a real special token
    and let it open a turn of its own. Here only the template's parts are tokenized with
    special tokens; the message is tokenized by a copy of the tokenizer that splits
    special-token strings into ordinary text tokens (a copy, because the flag is state of the
    Rust tokenizer that vLLM shares).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        from tokenizers import Tokenizer

        rendered = chat_prompt(tokenizer, _MESSAGE_SLOT)
        if rendered.count(_MESSAGE_SLOT) != 1:
            raise ValueError("the chat template does not render the user message exactly once")
        prefix, suffix = rendered.split(_MESSAGE_SLOT)
        # As vLLM's chat route does: the rendered template carries its own special tokens.
        self._prefix = tokenizer.encode(prefix, add_special_tokens=False)
        self._suffix = tokenizer.encode(suffix, add_special_tokens=False)
        self._text = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._text.encode_special_tokens = True

    def encode(self, message: str) -> list[int]:
        """The prompt's token ids; special-token strings in ``message`` stay plain text."""
        text = self._text.encode(message, add_special_tokens=False).ids
        return [*self._prefix, *text, *self._suffix]
