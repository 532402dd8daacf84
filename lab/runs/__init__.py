"""MLflow records: where the store is, what a run holds, choosing runs, tables and plots of them.

    tracking   the tracking store, experiments, git info, params of a config
    records    what MLflow holds about a study's runs, read back
    selection  RunSelectionSettings and models chosen by `runs=experiment:<name>`
    tables     the markdown table writer and the comparison table
    plots      loss curves, throughput, lr, quality per source (PNG)
"""
