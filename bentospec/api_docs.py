"""What the Swagger UI (``/``) and ``/docs.json`` say about the service.

BentoML 1.4 fills the OpenAPI ``info`` with its own placeholder (the description of an unbuilt
service, version "None" unless served from a built Bento) and files its APIs and probes under
fixed tags; it offers no setting for either (bentoml/BentoML#2975). So an ASGI middleware, a
supported BentoML extension point, rewrites the spec BentoML generates: the project's
description and version, and one tag per route group. The OpenAI and OPEA routes carry their tags
from their FastAPI apps.
"""

from __future__ import annotations

import json
from typing import Any

from bentoml._internal.service.openapi import APP_TAG, INFRA_TAG
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentospec import __version__
from bentospec.opea import OPEA_TAG
from bentospec.openai_app import OPENAI_TAG
from bentospec.profile import Profile

DOCS_PATH = "/docs.json"
README = "README.md"
#: The README sections the description links to (title, anchor).
README_SECTIONS = (
    ("Calling the service", "calling-the-service"),
    ("OpenAI API", "openai-api"),
    ("Profiles", "profiles"),
    ("Benchmark, tuning, lossless check", "benchmark-tuning-lossless-check"),
    ("Build and deploy", "build-and-deploy"),
)
GENERATION_TAG = "generation"
PROBES_TAG = "probes"
#: Route groups in display order, with what they are for.
TAGS = (
    (
        GENERATION_TAG,
        "Raw prompts: `/generate` streams text, `/generate_full` returns text, token counts and "
        "this request's speculation (draft and accepted tokens).",
    ),
    (
        OPENAI_TAG,
        "vLLM's own OpenAI serving layer around this engine: models, completions, chat "
        "(tools, structured output), responses, tokenize/detokenize.",
    ),
    (OPEA_TAG, "OPEA GenAIComps `spec_decode` routes, for clients migrating from OPEA."),
    (
        PROBES_TAG,
        "Liveness, readiness and Prometheus metrics; open without the API key.",
    ),
)
#: BentoML's fixed tags, renamed to this service's groups.
_RENAMED = {APP_TAG.name: GENERATION_TAG, INFRA_TAG.name: PROBES_TAG}


def description(profile: Profile) -> str:
    """Markdown shown at the top of the Swagger UI."""
    links = " · ".join(f"[{title}]({README}#{anchor})" for title, anchor in README_SECTIONS)
    return (
        "vLLM speculative decoding as one BentoML service: a target model with a draft "
        "(model, EAGLE head, MTP layers or n-gram lookup) chosen per hardware profile, with "
        "the OpenAI and OPEA APIs and per-request speculation stats.\n\n"
        f"Serving profile **{profile.name}**: {profile.description} "
        f"(model `{profile.served_model_name}`).\n\n"
        f"Guide ({README}): {links}"
    )


def rewrite_spec(spec: dict[str, Any], profile: Profile) -> dict[str, Any]:
    """BentoML's spec with this project's info and route groups, as OpenAPI 3.1.

    BentoML labels its spec 3.0.2, but its schemas (pydantic v2) and the OpenAI routes' (FastAPI)
    are JSON Schema 2020-12, OpenAPI 3.1's dialect: a numeric ``exclusiveMinimum`` and
    ``{"type": "null"}`` are invalid 3.0, and OpenAPI tools (schemathesis) reject them.
    """
    spec["openapi"] = "3.1.0"
    spec["info"] = {
        "title": "bentospec",
        "description": description(profile),
        "version": __version__,
    }
    spec["tags"] = [{"name": name, "description": text} for name, text in TAGS]
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict) and "tags" in operation:
                operation["tags"] = [_RENAMED.get(tag, tag) for tag in operation["tags"]]
    return spec


class OpenAPIDocsMiddleware:
    """Answers ``GET /docs.json`` with :func:`rewrite_spec` applied to BentoML's answer."""

    def __init__(self, app: ASGIApp, profile: Profile) -> None:
        self.app = app
        self.profile = profile

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != DOCS_PATH:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []

        async def capture(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, capture)
        start = messages[0]
        if start["status"] != 200:
            for message in messages:
                await send(message)
            return
        raw = b"".join(m.get("body", b"") for m in messages[1:])
        body = json.dumps(rewrite_spec(json.loads(raw), self.profile)).encode()
        headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})
