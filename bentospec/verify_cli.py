"""``bentospec verify``' command line: the lossless check's options, its report, its exit code.

What is compared and how is :mod:`bentospec.verify`'s, imported (with transformers) only when
the command runs.
"""

from __future__ import annotations

import argparse

from bentospec.model_store import resolve_model
from bentospec.profile import load_profile


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    verify = subparsers.add_parser(
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
    verify.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
