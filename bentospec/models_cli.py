"""``bentospec models``' command line: store or download a profile's models ahead of serving.

Storing and resolving them is :mod:`bentospec.model_store`'s, building the embedded ones
:mod:`bentospec.model_build`'s; this module is the command.
"""

from __future__ import annotations

import argparse

from bentospec.model_store import embedded_name, resolve_model, store_embedded
from bentospec.profile import load_profile


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="prepare the models a profile needs")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser(
        "prepare",
        help="build a profile's embedded models into BentoML's model store / download its hub "
        "models (idempotent)",
    )
    prepare.add_argument("--profile", default="cpu", help="profile name (default: cpu)")
    prepare.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    for ref in load_profile(args.profile).model_refs():
        if (name := embedded_name(ref)) is not None:
            print(f"{ref} -> {store_embedded(name)} ({resolve_model(ref)})")
        else:
            print(f"{ref} -> {resolve_model(ref)}")
    return 0
