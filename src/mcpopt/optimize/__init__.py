"""Find and apply optimizations: scenarios, analyzer, score, rules, the autonomous loop, the advisor.

Modules (each one concern):

- `scenarios`: the YAML scenario format, templating (`{{steps.<id>.<path>}}`) and success criteria.
- `sandbox`: a scratch copy of a config's local state (git repos, folders, data files) for replays.
- `runner`: replays scenarios through the gateway (or directly, for a baseline), per step latency.
- `coverage`: every tool (and action) of the configured servers against the scenarios using it.
- `analyzer`: findings over telemetry rows (`mcpopt.telemetry.record.CallRecord` shape).
- `score`: the efficiency score (success 50%, call efficiency 30%, time efficiency 20%).
- `rules`: optimizations as data, persisted and versioned; `RulesFilter` applies them per call.
- `loop`: validate, apply, watch and roll back proposals (`optimization.auto_improvement`).
- `advisor`: replicas per upstream from an M/M/c (Erlang C) estimate, and a capacity forecast.
- `report`: the JSON report and the self-contained HTML report.

Dependencies point inward: `optimize` reads telemetry rows and the gateway's catalog, and writes
rules; the pipeline reads rules through `RulesFilter` (see `rules`).
"""
