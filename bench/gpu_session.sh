#!/usr/bin/env bash
# One prepared GPU session (the device machine has no network: Fashion-MNIST travels in .gpudata).
#   1. every image recipe's training speed on the GPU (bench/zoo_train_speed.py);
#   2. recipe variants for SimCLR, MoCo, BYOL and DINO side by side, chosen on a validation split
#      (bench/recipe_search.py); their weights, cards and validation scores come back in search.tgz.
# Usage there: bash bench/gpu_session.sh OUT_DIR BUDGET_S
set -uo pipefail
OUT_DIR=${1:?out dir}; BUDGET=${2:-300}
export SSL_COURSE_DATA_DIR=$PWD/.gpudata PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision, sklearn, numpy; print(torch.__version__, torchvision.__version__, sklearn.__version__, numpy.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
[ -n "${SKIP_SPEED:-}" ] || timeout 90 python3 bench/zoo_train_speed.py --device cuda --steps 30 2>&1 | tee "$OUT_DIR/speed.txt"
echo "speed bench: $(( $(date +%s) - t0 )) s"
timeout $(( BUDGET + ${SEARCH_SLACK:-150} )) python3 bench/recipe_search.py --device cuda --out /tmp/search \
  --budget-s "$BUDGET" --threads 4 --no-evaluate --fit-speed --variants "${VARIANTS:-bench/recipe_variants.json}" 2>&1 | tee "$OUT_DIR/search.txt"
echo "search: $(( $(date +%s) - t0 )) s"
cd /tmp/search && tar czf "$OUT_DIR/search.tgz" --ignore-failed-read logs variants/*/val.json variants/*/*-*.json variants/*/*.safetensors chosen.json
ls -la "$OUT_DIR"
