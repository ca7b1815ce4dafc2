"""CRD: contrastive representation distillation (``--training_type crd``, or ``CRD/train_student.py``)."""
