"""MHKD student training as a script: the console with --training_type mhkd (flags: final_test.py --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import final_test  # noqa: E402

if __name__ == "__main__":
    sys.exit(final_test.main_as("mhkd", sys.argv[1:], prog="MHKD/mhkd_training.py"))
