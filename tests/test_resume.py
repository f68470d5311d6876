"""kill -9 a real extraction subprocess at random points; the re-run must give bit-identical features."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from featurecache import load_features
from featurecache.config import Paths
from tests.helpers import make_image_folder, wait_until

BASE = "mobilenet_v2_offline"
LAYERS = "features.3,features.10:grid2,flatten"
ARGS = ["--base", BASE, "--layers", LAYERS, "--dtype", "float32", "--batch-size", "4", "--splits", "train",
        "--no-progress", "--device", "cpu"]  # fmt: skip


def extract_cmd(root: Path, *extra: str) -> list[str]:
    # Niced, so that on a busy machine the test's polls still come between the victim's batches.
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    return [*nice, sys.executable, "-m", "pipelines.cli", "extract", str(root), *ARGS, *extra]


def env_for(home: Path) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    return {**os.environ, "FEATURECACHE_HOME": str(home), "PYTHONPATH": str(repo)}


def committed_shards(partial: Path) -> int:
    return len(list(partial.glob("rows-*.npz"))) if partial.is_dir() else 0


def kill_points(rng: random.Random) -> list[tuple[str, Callable[[Path, Path], bool]]]:
    """Where each attempt is killed, by observed progress only: journal opened but nothing committed, after a
    random number of committed batches (twice, mid-way through the next batch), and while the HDF5 file is
    being assembled under its temporary name (a short phase: if the run finishes first, it simply completes)."""
    first = rng.randint(1, 4)
    second = first + rng.randint(2, 5)
    return [
        ("journal opened", lambda partial, final: (partial / "manifest.json").is_file()),
        (f"{first} batches committed", lambda partial, final: committed_shards(partial) >= first),
        (f"{second} batches committed", lambda partial, final: committed_shards(partial) >= second),
        ("assembling", lambda partial, final: any(final.parent.glob(f".{final.name}.tmp-*"))),
    ]


@pytest.mark.slow
def test_kill_minus_9_at_random_points_then_resume_is_bit_identical(tmp_path):
    root = make_image_folder(tmp_path / "kill", per_class={"train": 16, "val": 2, "test": 2})  # 12 batches of 4
    reference_home, victim_home = tmp_path / "ref", tmp_path / "victim"
    # The victims run the defaults (ONNX Runtime's lanes decoding their own batches on threads); the reference
    # decodes in its main thread (DataLoader): resumed runs must give its numbers bit for bit.
    subprocess.run(extract_cmd(root, "--workers", "0"), env=env_for(reference_home), check=True, capture_output=True)
    reference = Paths(reference_home).feature_file("kill", BASE, "train")

    final = Paths(victim_home).feature_file("kill", BASE, "train")
    partial = final.with_name("train.h5.partial")
    killed_at, logs = [], []
    for attempt, (point, reached) in enumerate(kill_points(random.Random(1234))):
        log_path = tmp_path / f"attempt{attempt}.log"
        logs.append(log_path)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(extract_cmd(root), env=env_for(victim_home), stdout=log, stderr=log)
        if wait_until(lambda reached=reached: reached(partial, final), proc, what=f"extraction to reach {point}"):
            os.kill(proc.pid, signal.SIGKILL)
            killed_at.append(point)
        proc.wait()
        assert not final.exists() or proc.returncode == 0, f"a run killed at {point} left a file under the final name"
    # The first three points are reached long before a 12-batch run can finish, so they are always killed.
    assert killed_at[:3] == [point for point, _ in kill_points(random.Random(1234))[:3]], killed_at
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
