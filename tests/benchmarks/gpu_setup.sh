#!/usr/bin/env bash
# Source at the start of a command on the GPU machine (no network there):
#   . tests/benchmarks/gpu_setup.sh
# Installs the carried wheels (.gpu/gpu/wheels, and .gpu/extra where carried) and registers the prebuilt gsplat
# CUDA extension for every Python process, so `import gsplat` compiles nothing.
set -e
python3 -m pip install -q --no-deps --no-index .gpu/gpu/wheels/*.whl $(ls .gpu/extra/*.whl 2>/dev/null)
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
echo "import sys; sys.path.insert(0, '$PWD/.gpu/gpu'); import prebuilt_gsplat; prebuilt_gsplat.install(False)" > "$site/zz_prebuilt_gsplat.pth"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, gsplat; print('torch', torch.__version__, 'gsplat', gsplat.__version__, 'cuda', torch.cuda.is_available())"
set +e
