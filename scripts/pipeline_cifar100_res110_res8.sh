#!/usr/bin/env bash
# The same sweep as sweep_cifar100_res110_res8.sh in one command: --training_type pipeline trains the
# teacher and its heads once, every method over the seeds, skips what is finished, resumes what was
# interrupted, and ends with the report (report.md, report.csv) in the folder. Rerun it after a kill.
# Change the variables below (or set them in the environment); keep paths free of spaces.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-cifar100}
DATA_DIR=${DATA_DIR:-./data}
EPOCHS=${EPOCHS:-200}
SCHEDULE=${SCHEDULE:-"60 120 180"}
GPU=${GPU:-cuda:0}
SEEDS=${SEEDS:-"30 50 67"}
METHODS=${METHODS:-"ce kd dih fitnets takd at crd tofd mhkd"}
OUT=${OUT:-runs/${DATASET}_res110_res8}
PYTHON=${PYTHON:-python3}

$PYTHON final_test.py --training_type pipeline --methods $METHODS --teacher res110 --student res8 --ta res20 --dataset $DATASET --data_dir $DATA_DIR --epochs $EPOCHS --schedule $SCHEDULE --gpu_id $GPU --batch_size 64 --lr 0.1 --wd 0.0005 --kd_alpha 0.1 --kd_temperature 5 --seed $SEEDS --path_to_save $OUT
$PYTHON report.py $OUT --plots --out $OUT/report
