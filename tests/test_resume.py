"""kill -9 a real extraction subprocess at random points; the re-run must give bit-identical features."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featurecache import load_features
from featurecache.config import Paths
from tests.helpers import make_image_folder

BASE = "mobilenet_v2_offline"
LAYERS = "features.3,features.10:grid2,flatten"
ARGS = ["--base", BASE, "--layers", LAYERS, "--dtype", "float32", "--batch-size", "4", "--workers", "0",
        "--splits", "train", "--no-progress", "--device", "cpu"]  # fmt: skip


def extract_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "extract", str(root), *ARGS]


def env_for(home: Path) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    return {**os.environ, "FEATURECACHE_HOME": str(home), "PYTHONPATH": str(repo)}


@pytest.mark.slow
def test_kill_minus_9_at_random_points_then_resume_is_bit_identical(tmp_path):
    root = make_image_folder(tmp_path / "kill", per_class={"train": 16, "val": 2, "test": 2})
    reference_home, victim_home = tmp_path / "ref", tmp_path / "victim"
    subprocess.run(extract_cmd(root), env=env_for(reference_home), check=True, capture_output=True)
    reference = Paths(reference_home).feature_file("kill", BASE, "train")

    final = Paths(victim_home).feature_file("kill", BASE, "train")
    partial = final.with_name("train.h5.partial")
    rng = random.Random(1234)
    kills = 0
    logs = []
    for attempt in range(4):
        log_path = tmp_path / f"attempt{attempt}.log"
        logs.append(log_path)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(extract_cmd(root), env=env_for(victim_home), stdout=log, stderr=log)
        # Kill either after a random number of committed batches or after a random delay (start-up,
        # tracing, mid-batch, or while the HDF5 file is being assembled).
        target = rng.randint(1, 11)
        deadline = time.monotonic() + rng.uniform(0.5, 12.0)
        while proc.poll() is None and time.monotonic() < deadline:
            if partial.is_dir() and len(list(partial.glob("rows-*.npz"))) >= target:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not final.exists() or proc.returncode == 0, "a killed run left a file under the final name"
        if final.exists():
            break
    assert kills >= 2
    done = subprocess.run(extract_cmd(root), env=env_for(victim_home), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for layer in ("features.3", "features.10@grid2", "flatten"):
        X_ref, y_ref, m_ref = load_features(reference, layer)
        X, y, m = load_features(final, layer)
        assert X.dtype == np.float32
        np.testing.assert_array_equal(X, X_ref)
        np.testing.assert_array_equal(y, y_ref)
        assert m["paths"].tolist() == m_ref["paths"].tolist()
    assert not partial.exists()
    resumed = [p.read_text() for p in logs] + [done.stderr]
    assert any("resuming train:" in text for text in resumed), "no run resumed from committed batches"
