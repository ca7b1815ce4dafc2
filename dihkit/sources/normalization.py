"""The per-channel mean and standard deviation a run normalises its images with (``--normalization``).

Published codebases differ in the last digits of their CIFAR constants, and a published checkpoint is
reproduced with its own. ``dataset``: the constants each dataset source states (``data_sources``; measured on
the training images for image folders). The named tables replace them for the datasets they list; any other
dataset keeps its own.
"""
from dataclasses import replace

from dihkit.sources.data_types import DatasetInfo

NORMALIZATIONS = {
    # The DIH authors' dataload.py (get_cifar, get_test_loader_cifar).
    "dih": {"cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
            "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))},
    # RepDistiller's dataset/cifar100.py and mdistiller's mdistiller/dataset/cifar100.py (CIFAR-100 only).
    "repdistiller": {"cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))},
    "dataset": {},
}


def normalized(info: DatasetInfo, name: str) -> DatasetInfo:
    """``info`` with the mean and std of table ``name`` where it lists the dataset, else unchanged."""
    constants = NORMALIZATIONS[name].get(info.name)
    return replace(info, mean=constants[0], std=constants[1]) if constants else info
