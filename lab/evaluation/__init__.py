"""Evaluating a model and its variants: perplexity, bits per byte, tasks, lm-eval, efficiency.

    settings       EvaluateSettings and its nodes (lab.evaluate, lab.bench_eval)
    suite          the evaluation run: held-out bpb, text perplexity, tasks, efficiency, MLflow
    tasks          offline log-likelihood multiple choice on a small JSONL format
    lm_eval_tasks  lm-eval tasks on the model already loaded
"""
