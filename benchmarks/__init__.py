"""The twotower benchmark harness (not part of the installed library).

    pip install -e ".[bench]" && python benchmarks/bench.py --update-readme

Modules: `bench` (entry point, options, the run), `modes` (each mode = a name + a decoder),
`harness` (prompts, models, timed interleaved runs, memory), `training_speed`, `phases` (the
per-phase profile), `report` (markdown, JSON, README section, plot). Generation goes through the
public `twotower.decoding` decoders and the quality scores come from `twotower.evaluation`, so
the harness measures exactly what a user would run.
"""
