#!/usr/bin/env bash
# Runs the gpu-sdxl benchmark on the project's lent GPU machine (or any CUDA box without diffusers),
# from the repository root, with the wheels of benchmarks/fetch_gpu_wheels.sh carried in .whl/.
# Extra arguments go to bench_generate.py (e.g. --runs 7 --batches 1). Results and the log are
# copied to $OUT (the device tool brings them back); see benchmarks/README.md.
# BENCH=guidance runs bench_guidance.py's gpu-sdxl profile instead (ControlNet cost and ESRGAN x4;
# extra arguments go to it, e.g. --parts esrgan); it needs spandrel among the carried wheels.
# BENCH=speed runs bench_speed.py's gpu-sdxl profile: diffusers eager and compiled against refgen's speed modes
# (extra arguments go to it; a 10-minute plan: --sides diffusers-eager refgen-eager refgen-compiled --batches 1 --runs 3).
# BENCH=training runs bench_training.py's gpu-sdxl profile: refgen's LoRA training against diffusers'
# train_dreambooth_lora_sdxl.py (full-size SDXL, random weights, rank 16, 1024², batch 1, checkpointing, bf16).
# The script is not in the repository: put it (bench_training.py's docstring says where from) in
# .diffusers_scripts/ (add `/.diffusers_scripts/` to .git/info/exclude) and carry it with .whl, or name
# another path in DIFFUSERS_SCRIPT. Extra arguments go to bench_training.py (e.g. --steps 25 --sides refgen diffusers).
set -uo pipefail
out="${OUT:-/tmp/bench-out}"
bench="${BENCH:-generate}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, diffusers, transformers, pydantic; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__, torch.cuda.get_device_name())" || exit 1
if [ "$bench" = speed ]; then
  python3 benchmarks/bench_speed.py --profile gpu-sdxl --dry-run || exit 1
  python3 benchmarks/bench_speed.py --profile gpu-sdxl --workdir /tmp/speed "$@" 2>&1 | tee "$out/speed-gpu-sdxl.log"
  status=${PIPESTATUS[0]}
  cp benchmarks/results/speed-gpu-sdxl*.json "$out/" 2>/dev/null
  exit "$status"
fi
if [ "$bench" = training ]; then
  script="${DIFFUSERS_SCRIPT:-.diffusers_scripts/train_dreambooth_lora_sdxl.py}"
  python3 -c "import peft, accelerate, torchvision; print('peft', peft.__version__, 'accelerate', accelerate.__version__, 'torchvision', torchvision.__version__)" || exit 1
  python3 benchmarks/bench_training.py --profile gpu-sdxl --diffusers-script "$script" --dry-run || exit 1
  python3 benchmarks/bench_training.py --profile gpu-sdxl --diffusers-script "$script" --workdir /tmp/training "$@" 2>&1 | tee "$out/training-gpu-sdxl.log"
  status=${PIPESTATUS[0]}
  cp benchmarks/results/training-gpu-sdxl.json benchmarks/results/training-gpu-sdxl.md "$out/" 2>/dev/null
  tail -c 20000 /tmp/training/log-*.txt > "$out/training-children.log" 2>/dev/null
  exit "$status"
fi
if [ "$bench" = guidance ]; then
  python3 -c "import spandrel; print('spandrel', spandrel.__version__)" || exit 1
  python3 benchmarks/bench_guidance.py --dry-run || exit 1
  python3 benchmarks/bench_guidance.py --profile gpu-sdxl "$@" 2>&1 | tee "$out/guidance-gpu-sdxl.log"
  status=${PIPESTATUS[0]}
  cp benchmarks/results/controlnet-gpu-sdxl*.json benchmarks/results/esrgan-gpu-sdxl*.json "$out/" 2>/dev/null
  exit "$status"
fi
python3 benchmarks/bench_generate.py --dry-run || exit 1
python3 benchmarks/bench_generate.py --profile gpu-sdxl "$@" 2>&1 | tee "$out/gpu-sdxl.log"
status=${PIPESTATUS[0]}
cp benchmarks/results/gpu-sdxl*.json "$out/" 2>/dev/null
exit "$status"
