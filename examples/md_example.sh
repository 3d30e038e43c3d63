#!/usr/bin/env bash
# e2ip-md example: plain Langevin MD and uncertainty-driven dynamics (UDD) with trust bands.
# Under two minutes on one CPU core: trains a small NequIP e2ip model for 4 epochs on the shipped molecules
# (skip it with MODEL=path/to/best.ckpt, .nequip.zip, .nequip.pt2 or a MACE .model), then runs 200 steps
# of 0.5 fs at 500 K from an unseen isomer (e2ip_plugins/data/iso7_ood_mol.xyz, frame 0), plain and with UDD.
#   examples/md_example.sh                 # outputs in md_example_out/
#   MODEL=best.ckpt OUT=/tmp/md examples/md_example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv-nequip/bin}          # the environment of the model's framework (.venv-mace/bin for MACE)
OUT=${OUT:-md_example_out}
MODEL=${MODEL:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$OUT"
if [ -z "$MODEL" ]; then
  "$BIN/nequip-train" -cp "$PWD/configs/nequip" -cn e2ip hydra.run.dir="$OUT/train" "run=[train]" max_epochs=4 \
    > "$OUT/train.log" 2>&1
  MODEL="$OUT/train/best.ckpt"
fi
COMMON=(--model "$MODEL" --structure e2ip_plugins/data/iso7_ood_mol.xyz --index 0 --temperature 500
        --steps 200 --timestep 0.5 --interval 10 --trust-lo 3.0 --trust-hi 5.0 --seed 0 --overwrite)
"$BIN/e2ip-md" "${COMMON[@]}" --out "$OUT/plain"
"$BIN/e2ip-md" "${COMMON[@]}" --udd 1.0 0.5 --out "$OUT/udd"
for run in plain udd; do
  echo "== $run: $OUT/$run/summary.json"
  "$BIN/python" -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in
      ('status','steps','counts','first_candidate_step','stop_step','max_u_max','mean_max_u')})" "$OUT/$run/summary.json"
done
