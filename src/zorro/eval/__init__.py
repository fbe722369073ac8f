"""Evaluation beyond the training loop: `tables` (the one V / A / A+V table formatter), `run_reports` (a run's
PNG/CSV reports, the RunReports callback), `sweep_report` (a multirun directory -> one Table-3 table),
`probe` (linear probe on frozen features) and `predict` (top-k classes for your own files).

Above the tasks (`probe` and `predict` build on them, `run_reports` reads their results); the tasks never import
this package: what both read of the evaluation protocol is zorro.protocol. Kept import-free, so importing one
module does not import the others."""
