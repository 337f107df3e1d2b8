"""Runners over trained checkpoints: evaluation (predict once, then score) and prediction on new images."""
