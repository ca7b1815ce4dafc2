"""MHKD: multi-head knowledge distillation (``--training_type mhkd``, or ``MHKD/mhkd_training.py``)."""
from .mhkd import train_mhkd

__all__ = ["train_mhkd"]
