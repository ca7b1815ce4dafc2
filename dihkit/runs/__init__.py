"""The run machinery beneath the training loop: run context and state (resume), outputs and claims,
evaluation, model loading, the method contract, the distributed helpers."""
