"""How a flow runs.

- `flow`: the async-flow decorator; `parameters`: each flow's parameter contract.
- `batch`: `BatchRun`, one run over a source's batches, made of
  `growth` (batches, grown over a cached rerun), `pipeline` (tasks submitted ahead, one API client),
  `progress` (the progress artifact) and `stats` (per-step figures).
- `totals`: `RunTotals`, what a run added up to, and the finish every run shares, through
  `artifacts` (summary and tables) and `events` (the completion event); the failure rule.
- `fanout`: a job split into shards over a work pool, their totals summed.

Within the folder imports point down this list's dependencies: `batch` → `growth`, `pipeline`,
`progress`, `stats`, `totals`; `totals` → `artifacts`, `events`, `stats`; `fanout` → `totals`, `artifacts`.
"""
