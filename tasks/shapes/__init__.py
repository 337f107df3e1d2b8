"""The shapes world: the synthetic dataset behind the embedded default (generator, class targets, report, configs)."""
