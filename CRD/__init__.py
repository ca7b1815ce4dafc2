"""CRD: contrastive representation distillation (``--training_type crd``, or ``CRD/train_student.py``)."""
from .crd import train_crd

__all__ = ["train_crd"]
