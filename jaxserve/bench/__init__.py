"""Benchmarks that show what chunked prefill buys (`jaxserve-bench`).

One concept per file: `workloads` (which requests arrive when), `runner` (drives an engine on the
real clock and times every step), `roofline` (the machine's measured matmul and memory limits, and
MFU / MBU of the run's steps), `report` (the JSON and the tables), `plot` (the stall picture),
`peer` (the same workload through Hugging Face `transformers`, when installed), `vllm_peer` /
`vllm_worker` (the same workload on vLLM, in its own process), and `suite` (the whole benchmark as
one function the CLI and the tests call). The score workload (multiple-choice scoring through
`LLM.score`, prefix cache on vs off) has its own: `score_workload` (the pairs), `score_bench`
(the runs and their comparison), `score_report` (its tables), `vllm_score` (vLLM's side).
"""
