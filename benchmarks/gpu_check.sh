#!/bin/sh
# The GPU check of issue #14 (part 3) in one command, for a session that the device tool lends a GPU:
#   run(command="sh benchmarks/gpu_check.sh", timeout_s=540)
# It needs only what that machine's image holds (python3 with torch, torchvision, h5py, Pillow, scikit-learn,
# pytest): nothing is installed. About 4-5 minutes: the CUDA tests (nvjpeg against libjpeg-turbo, the on-device
# normalize bit for bit, bf16 extraction near the CPU's float32), then make bench's gpu section (resnet50 random
# init, end to end / bare forward with PIL decoding and with --decode gpu). Everything it prints goes to $OUT/log
# too when $OUT is set (the device tool's folder of files that come back).
set -eu
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 FEATURECACHE_HOME="$(mktemp -d)"
log="${OUT:-$FEATURECACHE_HOME}/log"
{
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
    python3 -m pytest -q -p no:cacheprovider -rs -s -k on_cuda tests/test_cuda.py tests/test_gpu_decode.py || echo "TESTS FAILED"
    python3 -m benchmarks.bench --only gpu || echo "BENCH FAILED"
} 2>&1 | tee "$log"
