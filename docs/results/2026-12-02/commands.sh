# Round 3 of the real-data study (2026-12-02, issue 24): published recipes against the defaults, and DIH's
# heads kept at their lowest validation loss against the last epoch. CIFAR-10 JPEGs from ../shared/data,
# 2-core CPU shared with four other jobs (load average 5 to 7), OMP_NUM_THREADS=1 for every process,
# two streams side by side. Budget: 4,000 training images (+500 validation), 2,000 test images, res20
# teacher 12 epochs, heads and students 5 epochs.
export OMP_NUM_THREADS=1
mkdir -p /tmp/cifar10-jpeg && tar -xzf /work/shared/data/cifar10-train-jpeg.tar.gz -C /tmp/cifar10-jpeg
python3 scripts/split_imagefolder.py /tmp/cifar10-jpeg/train /tmp/c10s --test_per_class 200 --train_per_class 450
R=/tmp/repro24
DATA="--dataset imagefolder --data_dir /tmp/c10s --val_size 500 --gpu_id cpu"
python3 final_test.py --training_type ce --teacher res20 $DATA --epochs 12 --schedule 6 9 --seed 30 --path_to_save $R/runs/teacher_res20.pth
# The same teacher's heads, twice: the last epoch, and each head at its own epoch of lowest validation loss
HEADS="--training_type fine_tune --teacher res20 --saved_path $R/runs/teacher_res20.pth $DATA --epochs 5 --schedule 3 4 --seed 30"
python3 final_test.py $HEADS --head_selection last --path_to_save $R/heads_last &
python3 final_test.py $HEADS --head_selection lowest_val_loss --path_to_save $R/heads_lowest &
wait
COMMON="--teacher res20 --student res8 --saved_path $R/runs/teacher_res20.pth $DATA --epochs 5 --schedule 3 4 --seed 30 50 67"
P="python3 final_test.py --training_type pipeline"
( $P --methods dist $COMMON --path_to_save $R/dist111
  $P --methods dist --recipe dist_cifar $COMMON --path_to_save $R/dist_cifar
  $P --methods dih $COMMON --saved_intermediates_directory $R/heads_last --path_to_save $R/dih_last ) &
( $P --methods kd $COMMON --path_to_save $R/kd
  $P --methods kd --recipe ls $COMMON --path_to_save $R/kd_ls
  $P --methods dih $COMMON --saved_intermediates_directory $R/heads_lowest --path_to_save $R/dih_lowest ) &
wait
# The tables and comparisons: the two DIH runs share their flags (only the heads folder differs), so
# each gets its own table against KD; the DIST and KD pairs are compared within one table each.
O=docs/results/2026-12-02
python3 report.py $R/runs $R/dist111 $R/dist_cifar --out $O/dist --against "DIST (beta 1, gamma 1, tau 1)"
python3 report.py $R/runs $R/kd $R/kd_ls --out $O/kd_ls --against kd
python3 report.py $R/runs $R/kd $R/dih_last --out $O/dih_last_heads --against kd
python3 report.py $R/runs $R/kd $R/dih_lowest --out $O/dih_lowest_heads --against kd
