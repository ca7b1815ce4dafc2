#!/usr/bin/env bash
# The same sweep as sweep_cifar100_res110_res8.sh in one command: --training_type pipeline trains the
# teacher and its heads once, every method over the seeds, skips what is finished, resumes what was
# interrupted, prints a header before each step, and ends with the report (report.md, report.csv and
# the plots) in the folder. Rerun it after a kill. The knobs are in sweep_settings.sh and can be set from
# the environment, e.g. `EPOCHS=2 TRAIN_SUBSET=1000 METHODS="ce kd dih" bash scripts/pipeline_cifar100_res110_res8.sh`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
source "$HERE/sweep_settings.sh"
METHODS=${METHODS:-"ce kd dih dkd dist fitnets takd at crd tofd mhkd"}

$PYTHON final_test.py --training_type pipeline --methods $METHODS $FLAGS --seed $SEEDS --path_to_save $OUT
