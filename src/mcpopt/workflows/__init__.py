"""Cross-server workflows: DAGs of tool calls served as tools, sagas that undo, a durable journal, fan-out.

- `model`: definitions (typed parameters, steps, `for_each`, `when`, `compensate`, `fanout`) and
  their validation; `settings`: `gateway.workflows`.
- `engine`: one run (parallel steps, retries only when safe, compensation in reverse order,
  resume after a crash), built up in layers: `run_state` (units, step states), `run_base` (state,
  control, one journaled call), `run_result`, `saga` (compensation), `step_kinds` (single,
  `for_each`, fan-out steps), `replay` (resume from the journal); `fanout`: one call to several
  servers or every replica of one.
- `journal`: the `Journal` protocol and its SQLite implementation.
- `service`: the plugin (tools `workflow__<name>`, `mcpopt__workflow`, `mcpopt__fanout`; leases;
  take-over of orphaned runs); `agent`: `mcpopt__workflow`; `plugin`: wiring into a gateway.

This package imports nothing of the gateway but `GatewayAPI` / `ClientLink` (and the config
imports only `model` and `settings`), so it stays free of import cycles.
"""
