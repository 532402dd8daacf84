"""One training job: its settings, the LightningModule, callbacks, trainer, resume, MLflow run, export.

    settings    TrainSettings and its nodes (lab.train), checked before anything starts
    schedules   the learning-rate schedule over the step budget
    module      the one LightningModule
    callbacks   throughput/MFU/memory, stage-end exports and generations, the step log
    trainer     the Lightning Trainer: conf/trainer, the callbacks, the step budget
    resume      resume from a checkpoint, or reuse a finished run
    mlflow_run  the job's MLflow run: opened by rank 0, inputs recorded, ended on failure
    export      the HF export of a run
    model_card  README.md of an HF export
"""
