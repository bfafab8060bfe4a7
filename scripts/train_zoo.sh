#!/usr/bin/env bash
# Train and evaluate the model zoo: every recipe of ssl_course.zoo (or the ones named), then verify the files.
#   bash scripts/train_zoo.sh                       # CPU, every recipe, one after another
#   bash scripts/train_zoo.sh --device cuda         # one GPU; the cards record the hardware
#   bash scripts/train_zoo.sh simclr-fmnist-cnn mae-fmnist-vit
# Each `ssl-course zoo train NAME` checkpoints as it goes; run the script again with --resume after an interruption.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
DEVICE=auto; RESUME=""; NAMES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --resume) RESUME="--resume"; shift ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) NAMES+=("$1"); shift ;;
  esac
done
if [ ${#NAMES[@]} -eq 0 ]; then
  read -r -a NAMES <<< "$(python -c 'from ssl_course.zoo import RECIPES; print(*RECIPES)')"
fi
start=$(date +%s)
for name in "${NAMES[@]}"; do
  echo "== $name"
  ssl-course zoo train "$name" --device "$DEVICE" --no-progress $RESUME
  ssl-course zoo evaluate "$name" --device "$DEVICE"
done
ssl-course zoo verify
echo "zoo: ${#NAMES[@]} recipe(s) in $(( $(date +%s) - start )) s on $DEVICE"
