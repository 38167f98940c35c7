"""Training loop, losses and sampling (installed as `mimic_engine.training`)."""
