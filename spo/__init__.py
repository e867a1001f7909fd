"""spo: step-by-step preference optimization for Stable Diffusion, with an MLOps layer."""

__version__ = "0.1.0"
