"""Resolve model references to local directories that vLLM can load.

A reference is ``bentospec:<name>``, an embedded model that :mod:`bentospec.model_build`
builds offline on first use; a local directory, used as it is; or a Hugging Face repo id,
downloaded.

huggingface_hub is imported inside the function that needs it, so importing this
module stays cheap.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from bentospec import settings
from bentospec.model_build import EMBEDDED_PREFIX, ModelNotFoundError, prepare_embedded


def is_hub_reference(ref: str) -> bool:
    """Whether ``ref`` would be downloaded from the hub (neither embedded nor a local path)."""
    return not ref.startswith((EMBEDDED_PREFIX, "/", ".", "~")) and not Path(ref).is_dir()


def resolve_model(ref: str, *, token: str | None = None, progress: bool = True) -> str:
    """Turn a profile's model reference into a local directory path for vLLM.

    ``bentospec:<name>`` is built offline on first use; an existing directory is
    used as it is; anything else is downloaded from the Hugging Face hub with
    ``token`` (default ``$HF_TOKEN``), which is never logged.

    Raises:
        ValueError: ``bentospec:<name>`` names no embedded model.
        ModelNotFoundError: the reference cannot be resolved to a directory.
    """
    if ref.startswith(EMBEDDED_PREFIX):
        return str(prepare_embedded(ref.removeprefix(EMBEDDED_PREFIX), progress=progress))
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
