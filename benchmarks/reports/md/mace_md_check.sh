#!/bin/bash
# one seed of the 900 K MD xTB check: the shipped MACE config with level C (c) and with the head's level (a)
seed=$1; D=$(realpath -m "${OUT:-md_check}")/s$seed   # usage: OUT=dir bash this.sh SEED
mkdir -p $D; cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
for v in c a; do
  extra=""; [ $v = a ] && extra="--e2ip_committee 0"
  [ -f $D/$v/md_$v.model ] || .venv-mace/bin/mace_run_train_e2ip --config configs/mace/e2ip.yaml --name md_$v --work_dir $D/$v \
     --max_num_epochs 40 --num_channels 16 --MLP_irreps 16x0e --seed $seed $extra > $D/train_$v.log 2>&1
done
for v in c a; do
  .venv-mace/bin/python -m benchmarks.md_candidates_xtb run --model $D/$v/md_$v.model --out $D/xtb_$v > $D/md_$v.log 2>&1
  .venv-nequip/bin/python -m benchmarks.md_candidates_xtb label --out $D/xtb_$v > $D/label_$v.log 2>&1
done
echo ALLDONE > $D/done
