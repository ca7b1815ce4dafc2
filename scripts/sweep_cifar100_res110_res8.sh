#!/usr/bin/env bash
# Seed sweep of every method for a res110 teacher and a res8 student on CIFAR-100, one plain console
# command per line: the teacher and its heads once (first seed), then each method over all seeds, then
# the report. The outputs follow the pipeline's layout (README, "Sweeps, pipelines and reports"), so
# `final_test.py --training_type pipeline` and report.py read this folder too.
# Rerunning the script continues where it stopped: --resume skips finished runs and continues
# interrupted ones. Change the variables below (or set them in the environment); delete the methods you
# do not need. Variables are expanded unquoted: keep paths free of spaces.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-cifar100}
DATA_DIR=${DATA_DIR:-./data}
EPOCHS=${EPOCHS:-200}
SCHEDULE=${SCHEDULE:-"60 120 180"}
GPU=${GPU:-cuda:0}
SEEDS=${SEEDS:-"30 50 67"}
TEACHER=${TEACHER:-res110}
STUDENT=${STUDENT:-res8}
OUT=${OUT:-runs/${DATASET}_${TEACHER}_${STUDENT}}
PYTHON=${PYTHON:-python3}
FIRST_SEED=${SEEDS%% *}

COMMON="--dataset $DATASET --data_dir $DATA_DIR --epochs $EPOCHS --schedule $SCHEDULE --gpu_id $GPU --teacher $TEACHER --student $STUDENT --batch_size 64 --lr 0.1 --wd 0.0005 --kd_alpha 0.1 --kd_temperature 5 --resume"

# The teacher (CE) and its heads, shared by every student below.
$PYTHON final_test.py --training_type ce $COMMON --seed $FIRST_SEED --path_to_save $OUT/teacher.pth
$PYTHON final_test.py --training_type fine_tune $COMMON --seed $FIRST_SEED --saved_path $OUT/teacher.pth --path_to_save $OUT/heads

# One command per method over all seeds; each seed writes <method>_s<seed>.pth and its .json
# (with a single seed: <method>.pth).
$PYTHON final_test.py --training_type ce $COMMON --teacher $STUDENT --seed $SEEDS --path_to_save $OUT/ce.pth
$PYTHON final_test.py --training_type kd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/kd.pth
$PYTHON final_test.py --training_type dih $COMMON --saved_path $OUT/teacher.pth --saved_intermediates_directory $OUT/heads --seed $SEEDS --path_to_save $OUT/dih.pth
$PYTHON final_test.py --training_type fitnets $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/fitnets.pth
$PYTHON final_test.py --training_type takd $COMMON --ta res20 --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/takd.pth
$PYTHON final_test.py --training_type at $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/at.pth
$PYTHON final_test.py --training_type crd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/crd.pth
$PYTHON final_test.py --training_type tofd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/tofd.pth
$PYTHON final_test.py --training_type mhkd $COMMON --saved_path $OUT/teacher.pth --seed $SEEDS --path_to_save $OUT/mhkd.pth

# The table (Markdown, CSV) and the plots, next to the runs.
$PYTHON report.py $OUT --plots --out $OUT/report
