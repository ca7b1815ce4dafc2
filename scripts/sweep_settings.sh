# Sourced by sweep_cifar100_res110_res8.sh and pipeline_cifar100_res110_res8.sh: the knobs both scripts
# share, each settable from the environment, and FLAGS, the console flags they make. Every knob reaches
# every phase, so a small budget (EPOCHS=2 TRAIN_SUBSET=1000) shrinks the whole sweep. Variables are
# expanded unquoted: keep paths free of spaces.
DATASET=${DATASET:-cifar100}
DATA_DIR=${DATA_DIR:-./data}
TRAIN_SUBSET=${TRAIN_SUBSET:-0}     # class-balanced training images; 0: all
VAL_SIZE=${VAL_SIZE:-0}             # validation images held out of training; 0: none
EPOCHS=${EPOCHS:-200}
SCHEDULE=${SCHEDULE:-}              # lr milestones; empty: the console's 30/60/90% of EPOCHS (60 120 180 for 200)
# FitNets' stage 1 trains 40 epochs for the recipe's 200: 20% of EPOCHS, at least 1.
EPOCHS_FITNETS_1=${EPOCHS_FITNETS_1:-$(( EPOCHS / 5 > 0 ? EPOCHS / 5 : 1 ))}
GPU=${GPU:-}                        # cuda:N or cpu; empty: cuda:0 when there is one, else cpu
SEEDS=${SEEDS:-"30 50 67"}
TEACHER=${TEACHER:-res110}
STUDENT=${STUDENT:-res8}
TA=${TA:-res20}                     # TAKD's assistant
OUT=${OUT:-runs/${DATASET}_${TEACHER}_${STUDENT}}
PYTHON=${PYTHON:-python3}

# The distillation weights are left to each method's default (TOFD has its own alpha and temperature).
FLAGS="--dataset $DATASET --data_dir $DATA_DIR --train_subset $TRAIN_SUBSET --val_size $VAL_SIZE --epochs $EPOCHS ${SCHEDULE:+--schedule $SCHEDULE} --epochs_fitnets_1 $EPOCHS_FITNETS_1 ${GPU:+--gpu_id $GPU} --teacher $TEACHER --student $STUDENT --ta $TA --batch_size 64 --lr 0.1 --wd 0.0005"
