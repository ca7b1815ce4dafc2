"""TOFD: task-oriented feature distillation (``--training_type tofd``, or ``TOFD/tofd_train.py``)."""
