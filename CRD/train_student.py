"""CRD student training as a script: the console with --training_type crd (flags: final_test.py --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import final_test  # noqa: E402

if __name__ == "__main__":
    sys.exit(final_test.main_as("crd", sys.argv[1:], prog="CRD/train_student.py"))
