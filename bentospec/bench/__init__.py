"""``bentospec bench``: tokens/s, TTFT, inter-token latency and acceptance, with and without
speculation, at several concurrency levels, in-process, through this service, or through
vLLM's own OpenAI server, greedy and sampled.

A benchmark you can trust:

* Tokens are counted per request from the responses themselves (the token ids of each
  output), and checked against the engine's ``vllm:generation_tokens`` counter once it has
  settled. For greedy runs, configs that generated different token totals for the same
  requests fail the run: their tokens/s would not measure the same work.
* Configs run interleaved in rounds (A B, B A, A B ...); figures are the median over rounds
  with the range, and speedups pair configs within a round, so machine load hits both sides.
* Every result records the git commit, the vLLM and BentoML versions, each config's resolved
  engine arguments, the CPU count and the load average.
* Inter-token latency is per token: a stream chunk carrying n tokens after a gap g counts as n
  latencies of g/n. Speculation emits several tokens per step.
* The peer comparison (``--peer``) drives this service's ``/v1/completions`` and ``python -m
  vllm.entrypoints.openai.api_server`` (same model directory, same ``--speculative-config``)
  with the same client, prompts and concurrency: what a user would run instead.
* The sampling workload (temperature 0.7, top_p 0.95, seeded per prompt) reports acceptance
  under sampling; its token totals legitimately differ between configs.

Modules: :mod:`~bentospec.bench.stats` (arithmetic), :mod:`~bentospec.bench.records` (what a
run records), :mod:`~bentospec.bench.figures` (figures derived from the rows),
:mod:`~bentospec.bench.checks` (consistency checks), :mod:`~bentospec.bench.report` (the
report: records, figures, checks), :mod:`~bentospec.bench.commands` (the command lines that
reproduce a run), :mod:`~bentospec.bench.render` (Markdown, plot),
:mod:`~bentospec.bench.clients` (engine and OpenAI clients), :mod:`~bentospec.bench.servers`
(server subprocesses, shared with the tests), :mod:`~bentospec.bench.runner` (rounds, levels),
:mod:`~bentospec.bench.cli` (command line).
"""
