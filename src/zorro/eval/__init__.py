"""Evaluation beyond the training loop: `tables` (the one V / A / A+V table formatter), `run_reports` (a run's
PNG/CSV reports, the RunReports callback), `sweep_report` (a multirun directory -> one Table-3 table),
`probe` (linear probe on frozen features) and `predict` (top-k classes for your own files).

Kept import-free: tasks import `tables`, and `probe` imports tasks."""
