#!/bin/bash
# one seed of the 900 K MD xTB check on NequIP: the shipped config (a: its level A) and with the opt-in committee, level C (c)
seed=$1; D=$(realpath -m "${OUT:-md_check}")/s$seed   # usage: OUT=dir bash this.sh SEED
mkdir -p $D; cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
COM=("++training_module.model.uq_head.committee={enabled: true, kind: message, num_members: 4, num_channels: 32, detach: true, level: scaled}" "++training_module.loss.coeffs.committee=0.01" "++training_module.loss.committee_nll_weight=0.0")
for v in a c; do
  if [ $v = c ]; then extra=("${COM[@]}"); else extra=(); fi
  [ -f $D/$v/best.ckpt ] || .venv-nequip/bin/nequip-train -cp configs/nequip -cn e2ip hydra.run.dir=$D/$v 'run=[train]' max_epochs=40 seed=$seed trainer.accelerator=cpu "${extra[@]}" > $D/train_$v.log 2>&1
done
for v in a c; do
  .venv-nequip/bin/python -m benchmarks.md_candidates_xtb run --model $D/$v/best.ckpt --out $D/xtb_$v > $D/md_$v.log 2>&1
  .venv-nequip/bin/python -m benchmarks.md_candidates_xtb label --out $D/xtb_$v > $D/label_$v.log 2>&1
done
echo ALLDONE > $D/done
