#!/usr/bin/env bash
# bench.gpu --real-shapes on a lent GPU host, in under eight minutes; the tables go to
# $OUT/gpu-real-shapes.txt (or ./gpu-real-shapes.txt) and the card to gpu-card.txt beside it.
#
# That host has Python 3.12, PyTorch, transformers, accelerate and peft but no network: the
# other packages bench.gpu imports travel as wheels in .device-wheels/ (git-ignored, about
# 13 MB), made here with `make device-wheels` and carried with the working tree. From the
# repository root, with the device tool:
#   run(command="bash bench/device.sh", carry=[".device-wheels"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
site=/tmp/device-site
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .device-wheels/*.whl
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee "$out_dir/gpu-card.txt"
# Option sets that would end past 330 s are left out by name; the image batching and the
# tables follow. timeout is the backstop for the eight minutes.
timeout 450 python3 -m bench.gpu --real-shapes --budget-s 330 --out "$out_dir/gpu-real-shapes.txt"
