"""The training engine: the task contract, the run config, the trainer and its parts (sampler, checkpoints,
distributed set-up, optimisation, evaluation passes). It sees only the task contract."""
