#!/usr/bin/env bash
# Download the wheels the gpu-sdxl benchmark needs on the project's lent GPU machine, whose image
# has torch 2.11, transformers 5.17, accelerate, safetensors, huggingface_hub, tokenizers, numpy,
# pillow, regex, peft, typer and rich, but no diffusers and no pydantic (KINDS.md, 2026-11-17), and
# no network. Python there is 3.12 on x86-64. Usage (repo root): benchmarks/fetch_gpu_wheels.sh [DEST]
# DEST defaults to .whl (add `/.whl/` to .git/info/exclude so it is carried, not committed).
set -euo pipefail
dest="${1:-.whl}"
python="${PYTHON:-python3}"
mkdir -p "$dest"
# Versions as in this project's CPU environment (TESTBED.md); --no-deps: each need is named.
packages=(
  diffusers==0.42.1          # not on the GPU image
  transformers==5.23.0       # the image has 5.17; match the CPU environment
  importlib-metadata==10.2.0 # diffusers needs it
  lazy-importer==0.1.0       # importlib-metadata 10 needs it
  zipp==4.1.2                # importlib-metadata needs >= 3.20
  regex==2026.11.15          # transformers 5.23 needs >= 2025.10.22 (compiled: cp312 wheel)
  pydantic==2.14.3           # engine.request
  pydantic-core==2.50.4      # compiled: the cp312 manylinux wheel
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic 2.14 needs >= 4.16 (the image's may be older)
  spandrel==0.4.2            # adapters.upscale (bench_guidance.py's ESRGAN part); torchvision, einops are on the image
  torchao==0.18.0            # engine.quantize (Engine.load(quantize="fp8"|"int8")); its C++ kernels may not match the
                             # image's torch 2.11, the float8/int8 paths used here are Python over torch._scaled_mm
)
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${packages[@]}"
du -sh "$dest"
