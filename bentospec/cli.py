"""``bentospec`` command line: models, profiles, benchmark, autotuner, lossless check.

Each command group registers its own sub-parser (``add_parser``) and handler (``run``), so a
command lives next to the code it drives.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from bentospec.cpu_host import detect_cpu_host
from bentospec.engine_args import engine_kwargs
from bentospec.model_store import resolve_model
from bentospec.profile import ProfileError, list_profiles, load_profile


def _add_models(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="prepare the models a profile needs")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser(
        "prepare", help="build offline models / download hub models of a profile (idempotent)"
    )
    prepare.add_argument("--profile", default="cpu", help="profile name (default: cpu)")
    prepare.set_defaults(handler=_models_prepare)


def _models_prepare(args: argparse.Namespace) -> int:
    for ref in load_profile(args.profile).model_refs():
        print(f"{ref} -> {resolve_model(ref)}")
    return 0


def _add_profiles(sub: argparse._SubParsersAction) -> None:
    profiles = sub.add_parser("profiles", help="list, show and check hardware profiles")
    profiles_sub = profiles.add_subparsers(dest="profiles_command", required=True)
    profiles_sub.add_parser("list", help="profile names and descriptions").set_defaults(
        handler=_profiles_list
    )
    show = profiles_sub.add_parser("show", help="resolved vLLM engine arguments of a profile")
    show.add_argument("name")
    show.set_defaults(handler=_profiles_show)
    check = profiles_sub.add_parser("check", help="validate one profile, or all of them")
    check.add_argument("name", nargs="?")
    check.set_defaults(handler=_profiles_check)


def _profiles_list(_: argparse.Namespace) -> int:
    for name in list_profiles():
        try:
            print(f"{name:16} {load_profile(name).description}")
        except ProfileError as exc:
            print(f"{name:16} INVALID: {exc}")
    return 0


def _profiles_show(args: argparse.Namespace) -> int:
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


def _profiles_check(args: argparse.Namespace) -> int:
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


def _add_verify(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser(
        "verify",
        help="speculation must not change the output: greedy token for token, or the sampled "
        "distribution with --sampling (exit 1 if not)",
    )
    verify.add_argument("--profile", default="cpu")
    verify.add_argument("--max-tokens", type=int, default=64)
    verify.add_argument("--num-prompts", type=int, default=None, help="default: whole dataset")
    verify.add_argument("--categories", nargs="*", default=None, help="e.g. rag code")
    verify.add_argument("--dtype", default="float32", help="float32 makes the check exact")
    sampling = verify.add_argument_group("--sampling: distribution check on one raw prompt")
    sampling.add_argument("--sampling", action="store_true")
    sampling.add_argument("--prompt", default=None, help="raw prompt (default: a built-in one)")
    sampling.add_argument("--samples", type=int, default=400, help="completions per run")
    sampling.add_argument("--temperature", type=float, default=1.0)
    verify.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    import asyncio

    from transformers import AutoTokenizer

    from bentospec.dataset import load_cases, render_cases
    from bentospec.verify import SAMPLING_PROMPT, verify, verify_sampling

    profile = load_profile(args.profile)
    if args.sampling:
        sampled = asyncio.run(
            verify_sampling(
                profile,
                args.prompt or SAMPLING_PROMPT,
                samples=args.samples,
                temperature=args.temperature,
                dtype=args.dtype,
            )
        )
        for p in sampled.positions:
            print(
                f"position {p.position}: chi2={p.chi2:.1f} over {p.categories} categories, "
                f"p={p.p_value:.3g}, TVD={p.tvd:.3f}"
            )
        print(
            f"{sampled.profile} ({sampled.method}, {sampled.dtype}, T={sampled.temperature}): "
            f"{sampled.samples} samples per run, {sampled.accepted_tokens}/"
            f"{sampled.draft_tokens} drafts accepted; "
            f"{'same distribution' if sampled.ok else 'DISTRIBUTIONS DIFFER'} "
            f"(family-wise alpha {sampled.alpha})"
        )
        return 0 if sampled.ok else 1
    cases = load_cases(categories=set(args.categories or ()), limit=args.num_prompts)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(profile.model.id))
    prompts = render_cases(cases, tokenizer)
    report = asyncio.run(verify(profile, prompts, max_tokens=args.max_tokens, dtype=args.dtype))
    for d in report.divergences:
        print(
            f"DIVERGED {cases[d.index].id} at token {d.position}: {d.baseline} != {d.speculative}"
        )
    print(
        f"{report.profile} ({report.method}, {report.dtype}): {report.prompts} prompts, "
        f"{report.tokens_compared} tokens compared, {len(report.divergences)} diverged"
    )
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bentospec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_models(sub)
    _add_profiles(sub)
    _add_verify(sub)
    from bentospec import kubernetes, tune_cli
    from bentospec.bench import cli as bench_cli
    from bentospec.bench import step_cost

    bench_cli.add_parser(sub)
    step_cost.add_parser(sub)
    tune_cli.add_parser(sub)
    kubernetes.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
