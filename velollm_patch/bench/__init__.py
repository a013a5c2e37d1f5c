"""``velollm-patch bench``: scenarios, targets, metrics, the A/B runner, reports and history.

The modules, from the bottom up: :mod:`.scenarios` (shipped prompt sets), :mod:`.metrics`
(samples, statistics, memory sampling), :mod:`.targets` (what is measured and how a request is
sent), :mod:`.runner` (runs and A/B rounds, result files), :mod:`.report` (Markdown and charts)
and :mod:`.history` (the SQLite list of past runs).
"""
