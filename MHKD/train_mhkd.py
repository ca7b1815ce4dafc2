"""MHKD student training under the script name the method's first commands used (``python3 train_mhkd.py``
in this folder): the same entry as ``MHKD/mhkd_training.py``, the console with --training_type mhkd."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import final_test  # noqa: E402

if __name__ == "__main__":
    sys.exit(final_test.main_as("mhkd", sys.argv[1:], prog="MHKD/train_mhkd.py"))
