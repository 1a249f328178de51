"""``bentospec profiles``' command line: list the catalogue, show a profile's engine arguments,
check profiles.

Loading is :mod:`bentospec.profile`'s and checking :mod:`bentospec.validation`'s; this module
prints them.
"""

from __future__ import annotations

import argparse
import json
import sys

from bentospec.cpu_host import detect_cpu_host
from bentospec.engine_args import engine_kwargs
from bentospec.profile import ProfileError, list_profiles, load_profile


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    profiles = subparsers.add_parser("profiles", help="list, show and check hardware profiles")
    profiles_sub = profiles.add_subparsers(dest="profiles_command", required=True)
    profiles_sub.add_parser("list", help="profile names and descriptions").set_defaults(
        handler=run_list
    )
    show = profiles_sub.add_parser("show", help="resolved vLLM engine arguments of a profile")
    show.add_argument("name")
    show.set_defaults(handler=run_show)
    check = profiles_sub.add_parser("check", help="validate one profile, or all of them")
    check.add_argument("name", nargs="?")
    check.set_defaults(handler=run_check)


def run_list(_: argparse.Namespace) -> int:
    for name in list_profiles():
        try:
            print(f"{name:16} {load_profile(name).description}")
        except ProfileError as exc:
            print(f"{name:16} INVALID: {exc}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    profile = load_profile(args.name)
    kwargs = engine_kwargs(profile)
    if (host_class := profile.hardware.host_class()) is not None:
        # What this host resolved, on stderr so that stdout stays the engine arguments' JSON.
        spec = profile.speculative
        schedule = "none"
        if spec is not None:
            own = host_class in (spec.host_schedules or {})
            schedule = f"host_schedules.{host_class}" if own else "the default"
        print(
            f"# this CPU: {detect_cpu_host().model}, class {host_class}: dtype {kwargs['dtype']}, "
            f"speculation schedule {schedule}",
            file=sys.stderr,
        )
    print(json.dumps(kwargs, indent=2, sort_keys=True))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from bentospec.validation import check_profile

    names = [args.name] if args.name else list_profiles()
    failed = 0
    for name in names:
        try:
            report = check_profile(load_profile(name))
        except ProfileError as exc:
            failed += 1
            print(f"FAIL {name}: {exc}")
            continue
        print(f"ok   {name}: {report}")
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0
