"""The whole study in one resumable command (`python -m lab.study`, this package's __main__).

    __main__  the command
    plan      the experiment's jobs and what each needs (train, resume or reuse)
    steps     prepare, train, quantize, evaluate, each skipped when done
    report    REPORT.md / REPORT.html, logged to MLflow
"""
