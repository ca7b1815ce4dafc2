#!/usr/bin/env bash
# Seed sweep of every method for a res110 teacher and a res8 student on CIFAR-100, one plain console
# command per step: the teacher and its heads once (first seed), then each method over all seeds, then
# the report with its plots. Each step first prints a header (`== [4/14] kd seeds 30 50 67`). The
# outputs follow the pipeline's layout (docs/PIPELINES.md), so `final_test.py --training_type pipeline`
# and report.py read this folder too.
# Rerunning the script continues where it stopped: --resume skips finished runs and continues
# interrupted ones. The knobs (dataset, epochs, subset, seeds, ...) are in sweep_settings.sh and can be
# set from the environment, e.g. `EPOCHS=2 TRAIN_SUBSET=1000 GPU=cpu bash scripts/sweep_cifar100_res110_res8.sh`.
# Delete the steps you do not need: the headers count the `step` lines.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
source "$HERE/sweep_settings.sh"

FIRST_SEED=${SEEDS%% *}
COMMON="$FLAGS --resume"
TOTAL=$(grep -c '^step ' "$HERE/$(basename "$0")")
DONE=0

step() {  # step <header> <script and its flags>: print the step's header, then run it
  DONE=$((DONE + 1))
  echo "== [$DONE/$TOTAL] $1"
  shift
  $PYTHON "$@"
}

# The teacher (CE) and its heads, shared by every student below.
step "teacher $TEACHER seed $FIRST_SEED" final_test.py --training_type ce $COMMON --seed $FIRST_SEED --path_to_save $OUT/teacher.pth
step "heads seed $FIRST_SEED" final_test.py --training_type fine_tune $COMMON --seed $FIRST_SEED --saved_path $OUT/teacher.pth --path_to_save $OUT/heads

# One command per method over all seeds; each seed writes <method>_s<seed>.pth and its .json
# (with a single seed: <method>.pth).
step "ce (student alone) seeds $SEEDS" final_test.py --training_type ce $COMMON --teacher $STUDENT --seed $SEEDS --path_to_save $OUT/ce.pth
step "kd seeds $SEEDS" final_test.py --training_type kd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/kd.pth
step "dih seeds $SEEDS" final_test.py --training_type dih $COMMON --saved_path $OUT/teacher.pth --saved_intermediates_directory $OUT/heads --seed $SEEDS --path_to_save $OUT/dih.pth
step "dkd seeds $SEEDS" final_test.py --training_type dkd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/dkd.pth
step "dist seeds $SEEDS" final_test.py --training_type dist $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/dist.pth
step "fitnets seeds $SEEDS" final_test.py --training_type fitnets $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/fitnets.pth
step "takd seeds $SEEDS" final_test.py --training_type takd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/takd.pth
step "at seeds $SEEDS" final_test.py --training_type at $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/at.pth
step "crd seeds $SEEDS" final_test.py --training_type crd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/crd.pth
step "tofd seeds $SEEDS" final_test.py --training_type tofd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/tofd.pth
step "mhkd seeds $SEEDS" final_test.py --training_type mhkd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/mhkd.pth

# The table (Markdown, CSV) and the plots, next to the runs.
step "report" report.py $OUT --plots --out $OUT/report
