"""The run's checks by dtype: float32 greedy outputs must agree, bf16 ones are compared and
reported (identical outputs, where they part) instead of failing the run."""

from __future__ import annotations

from bentospec.bench import checks, render
from bentospec.bench.records import NO_SPEC, BenchRow, RequestCount
from tests.conftest import make_row


def with_outputs(row: BenchRow, *outputs: list[int]) -> BenchRow:
    requests = [
        RequestCount(prompt=i, tokens=len(ids), digest=str(ids), token_ids=ids)
        for i, ids in enumerate(outputs)
    ]
    total = sum(len(ids) for ids in outputs)
    return row.model_copy(
        update={"requests": requests, "output_tokens": total, "counter_tokens": total}
    )


def rows() -> list[BenchRow]:
    """No speculation and ngram, one round: prompt 0 agrees, prompt 1 parts at position 2."""
    return [
        with_outputs(make_row(NO_SPEC, 4, speculative=None), [1, 2, 3, 4], [5, 6, 7, 8]),
        with_outputs(make_row("cpu", 4), [1, 2, 3, 4], [5, 6, 9, 9, 9]),
    ]


def dtypes(dtype: str) -> dict[str, str]:
    return {"no-spec via engine": dtype, "cpu via engine": dtype}


def test_float32_outputs_that_differ_fail_the_run() -> None:
    (problem,) = checks.token_problems(rows(), dtypes("float32"))
    assert "prompts that differ: [1]" in problem
    assert checks.greedy_agreement(rows(), dtypes("float32")) == []


def test_unknown_dtypes_are_held_to_float32() -> None:
    assert len(checks.token_problems(rows())) == 1


def test_bf16_outputs_are_compared_not_failed() -> None:
    assert checks.token_problems(rows(), dtypes("bfloat16")) == []
    (agreement,) = checks.greedy_agreement(rows(), dtypes("bfloat16"))
    assert agreement == checks.GreedyAgreement(
        config="cpu via engine",
        concurrency=4,
        round=1,
        identical=1,
        requests=2,
        first_divergence_p50=2,
    )
    table = render.agreement_table([agreement])
    assert table.splitlines()[-1] == "| cpu via engine | 4 | 1 | 1 / 2 | 2 |"


def test_a_response_count_the_counter_disagrees_with_fails_in_any_dtype() -> None:
    broken = [rows()[0], rows()[1].model_copy(update={"counter_tokens": 3})]
    (problem,) = checks.token_problems(broken, dtypes("bfloat16"))
    assert "the engine counted 3" in problem


def test_a_shorter_output_parts_where_it_ends() -> None:
    assert checks._first_difference([1, 2, 3], [1, 2]) == 2
    assert checks._first_difference([1, 2], [1, 2]) is None
