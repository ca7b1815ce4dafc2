# Round 2 of the real-data study (2026-11-30): CIFAR-10 JPEGs from ../shared/data, 2-core CPU,
# OMP_NUM_THREADS=1 for every process, two processes at a time (one per core).
export OMP_NUM_THREADS=1
mkdir -p /tmp/cifar10-jpeg && tar -xzf /work/shared/data/cifar10-train-jpeg.tar.gz -C /tmp/cifar10-jpeg
python3 scripts/split_imagefolder.py /tmp/cifar10-jpeg/train /tmp/c10 --test_per_class 500 --train_per_class 1000
R=/work/repro2
DATA="--dataset imagefolder --data_dir /tmp/c10 --val_size 500 --gpu_id cpu"
# The teacher, and beside it the student trained alone (it needs no teacher)
python3 final_test.py --training_type ce --teacher res20 $DATA --epochs 20 --schedule 10 15 --batch_size 64 --lr 0.1 --wd 5e-4 --seed 30 --path_to_save $R/runs/teacher_res20.pth
python3 final_test.py --training_type ce --teacher res8 $DATA --epochs 8 --schedule 4 6 --seed 30 50 67 --path_to_save $R/ce/ce.pth
# Then two streams side by side
COMMON="--teacher res20 --student res8 --saved_path $R/runs/teacher_res20.pth $DATA --epochs 8 --schedule 4 6"
# stream 1
python3 final_test.py --training_type pipeline --methods kd dih $COMMON --seed 30 50 67 --path_to_save $R/pipeA
python3 final_test.py --training_type pipeline --methods dih --logit_std $COMMON --saved_intermediates_directory $R/pipeA/heads --seed 30 50 67 --path_to_save $R/pipeLS
python3 final_test.py --training_type pipeline --methods tofd at crd takd --ta res14 $COMMON --seed 30 --path_to_save $R/pipeC
# stream 2 (DIH[DKD] waits for stream 1's heads)
python3 final_test.py --training_type pipeline --methods dkd dist $COMMON --seed 30 50 67 --path_to_save $R/pipeB
python3 final_test.py --training_type pipeline --methods dih --cohort_loss dkd $COMMON --saved_intermediates_directory $R/pipeA/heads --seed 30 50 67 --path_to_save $R/pipeDKD
python3 final_test.py --training_type pipeline --methods fitnets mhkd --epochs_fitnets_1 4 $COMMON --seed 30 --path_to_save $R/pipeD
# Afterwards, side by side: DKD's warm-up scaled to the budget (20 of 240 epochs -> 1 of 8)
python3 final_test.py --training_type pipeline --methods dkd $COMMON --dkd_warmup 1 --seed 30 50 67 --path_to_save $R/pipeW1
python3 final_test.py --training_type pipeline --methods dih --cohort_loss dkd $COMMON --dkd_warmup 1 --saved_intermediates_directory $R/pipeA/heads --seed 30 50 67 --path_to_save $R/pipeW2
# The table, the plots and the comparisons (report.py --against)
python3 report.py $R/runs $R/ce $R/pipeA $R/pipeB $R/pipeLS $R/pipeDKD $R/pipeC $R/pipeD $R/pipeW1 $R/pipeW2 --out docs/results/2026-11-30/cifar10_res20_res8 --plots --against kd
# Afterwards, side by side: DKD with mdistiller's beta for its plain CIFAR ResNet pairs (2), default warm-up
python3 final_test.py --training_type pipeline --methods dkd $COMMON --dkd_beta 2 --seed 30 50 67 --path_to_save $R/pipeB2
python3 final_test.py --training_type pipeline --methods dih --cohort_loss dkd $COMMON --dkd_beta 2 --saved_intermediates_directory $R/pipeA/heads --seed 30 50 67 --path_to_save $R/pipeDKD2
# The table with every run (the report line above, with pipeB2 and pipeDKD2 added)
python3 report.py $R/runs $R/ce $R/pipeA $R/pipeB $R/pipeLS $R/pipeDKD $R/pipeC $R/pipeD $R/pipeW1 $R/pipeW2 $R/pipeB2 $R/pipeDKD2 --out docs/results/2026-11-30/cifar10_res20_res8 --plots --against kd
