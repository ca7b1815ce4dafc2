"""TOFD: task-oriented feature distillation (``--training_type tofd``, or ``TOFD/tofd_train.py``)."""
from .tofd import train_tofd

__all__ = ["train_tofd"]
