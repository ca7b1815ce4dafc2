# Real-data reproduction (CIFAR-10 JPEGs from ../shared/data), 2-core CPU, OMP_NUM_THREADS=1 per process.
mkdir -p /tmp/cifar10-jpeg && tar -xzf /work/shared/data/cifar10-train-jpeg.tar.gz -C /tmp/cifar10-jpeg
python3 scripts/split_imagefolder.py /tmp/cifar10-jpeg/train /tmp/c10 --test_per_class 500 --train_per_class 1000
# Teacher (interrupted once with SIGTERM and resumed with --resume; see the log)
python3 final_test.py --training_type ce --teacher res20 --dataset imagefolder --data_dir /tmp/c10 --val_size 500 --epochs 20 --schedule 10 15 --batch_size 64 --lr 0.1 --wd 5e-4 --seed 30 --gpu_id cpu --path_to_save /work/repro/runs/teacher_res20.pth
# Stream A: heads + CE/KD/DIH students over three seeds
python3 final_test.py --training_type pipeline --methods ce kd dih --teacher res20 --student res8 --saved_path /work/repro/runs/teacher_res20.pth --dataset imagefolder --data_dir /tmp/c10 --val_size 500 --epochs 8 --schedule 4 6 --seed 30 50 67 --gpu_id cpu --path_to_save /work/repro/pipeA
# Stream B: the six other baselines, one seed
python3 final_test.py --training_type pipeline --methods fitnets takd at crd tofd mhkd --ta res14 --epochs_fitnets_1 4 --teacher res20 --student res8 --saved_path /work/repro/runs/teacher_res20.pth --dataset imagefolder --data_dir /tmp/c10 --val_size 500 --epochs 8 --schedule 4 6 --seed 30 --gpu_id cpu --path_to_save /work/repro/pipeB
# Stream C (started later to balance the cores): MHKD, one seed; stream B was stopped before its own MHKD step
python3 final_test.py --training_type pipeline --methods mhkd --teacher res20 --student res8 --saved_path /work/repro/runs/teacher_res20.pth --dataset imagefolder --data_dir /tmp/c10 --val_size 500 --epochs 8 --schedule 4 6 --seed 30 --gpu_id cpu --path_to_save /work/repro/pipeC
