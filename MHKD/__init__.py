"""MHKD: multi-head knowledge distillation (``--training_type mhkd``, or ``MHKD/mhkd_training.py``, also named
``MHKD/train_mhkd.py``)."""
