"""Beyond one process: what Hydra's launchers and sweepers need from the lab.

    launchers  ImportableTask for submitit, OptunaStorageReady and init_storage for shared sweeps
    pruning    stopping hopeless Optuna trials from inside the training job
"""
