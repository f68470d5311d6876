"""The CUDA path of stage 1 (eager PyTorch, bf16 autocast by default, uint8 pixels normalized on the device):
skipped in CI and here, which have no GPU; `sh benchmarks/gpu_check.sh` runs them on a lent one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurecache import load_features, read_metadata
from featurecache.bases import load_base
from featurecache.config import Paths
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.preprocess import Preprocessing
from tests.test_decode import photo_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_on_cuda_the_batched_normalize_equals_the_cpus_bit_for_bit():
    """ToTensor's division by 255 and Normalize, on the device, as on the CPU (a division, not a multiplication by
    the reciprocal: featurecache.preprocess.Preprocessing.normalize)."""
    preprocessing = Preprocessing(load_base("resnet18", weights="none").spec.transforms())
    pixels = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    on_cpu = preprocessing.normalize(pixels)
    on_gpu = preprocessing.normalize(pixels.cuda())
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)


def test_on_cuda_the_default_extraction_runs_bf16_autocast_near_the_cpus_float32(tmp_path):
    root = photo_folder(tmp_path / "photos")
    request = ExtractRequest(root, base="resnet18", weights="none", layers="layer2,avgpool", splits=["train"])
    common = {"dtype": "float32", "progress": False, "runtime": "eager"}
    (on_cpu,) = extract(request, paths=Paths(tmp_path / "cpu"), options=ExtractOptions(device="cpu", **common))
    (on_gpu,) = extract(request, paths=Paths(tmp_path / "gpu"), options=ExtractOptions(device="cuda", **common))
    meta = read_metadata(on_gpu.path)
    assert meta["amp"] == "bf16" and meta["config_fingerprint"] != read_metadata(on_cpu.path)["config_fingerprint"]
    X_cpu, X_gpu = (load_features(r.path, "avgpool")[0] for r in (on_cpu, on_gpu))
    assert np.abs(X_cpu - X_gpu).max() / np.abs(X_cpu).max() < 0.05  # bf16 keeps ~3 significant digits
