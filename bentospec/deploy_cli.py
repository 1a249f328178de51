"""``bentospec deploy``'s command line: options in, manifest files out.

The manifests themselves are :mod:`bentospec.kubernetes`'s; this module reads the options,
writes the files and says which secret the pods read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from bentospec import settings
from bentospec.kubernetes import HF_TOKEN_SECRET, KubernetesOptions, write
from bentospec.profile import format_validation_error, load_profile


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    deploy = subparsers.add_parser("deploy", help="write deployment manifests for a profile")
    targets = deploy.add_subparsers(dest="deploy_target", required=True)
    k8s = targets.add_parser(
        "kubernetes", help="Deployment, Service and HPA for the profile's Bento image"
    )
    k8s.add_argument("--profile", required=True)
    k8s.add_argument("--image", default=None, help="default: bentospec-PROFILE:latest")
    k8s.add_argument("--out", type=Path, default=None, help="default: build/kubernetes/PROFILE")
    k8s.add_argument("--namespace", default=None)
    k8s.add_argument("--min-replicas", type=int, default=1)
    k8s.add_argument("--max-replicas", type=int, default=4)
    k8s.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    try:
        options = KubernetesOptions(
            image=args.image or f"bentospec-{profile.name}:latest",
            namespace=args.namespace,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
        )
    except ValidationError as exc:
        print(f"error: {format_validation_error(exc)}", file=sys.stderr)
        return 2
    for path in write(profile, options, args.out or Path("build/kubernetes") / profile.name):
        print(f"wrote {path}")
    if profile.needs_hub_token():
        token = settings.HF_TOKEN.name
        print(f"the pods read {token} from secret {HF_TOKEN_SECRET!r} (docs/deploy.md)")
    return 0
