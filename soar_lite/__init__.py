"""soar-lite: SOAR LoRA fine-tuning for rectified-flow image models on one consumer GPU."""

__version__ = "0.1.0"
