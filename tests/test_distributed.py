"""torchrun extraction with 2 CPU ranks (gloo): same cache as one process, and resume after a rank is killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurecache import store
from featurecache.config import Paths
from featurecache.distributed import World
from featurecache.errors import FeaturecacheError
from featurecache.extract import batch_ranges, rank_batches
from tests.helpers import SAFETY_TIMEOUT_S, make_image_folder, wait_until

BASE = "mobilenet_v2_offline"
ARGS = ["--base", BASE, "--layers", "features.3,features.10:grid2,flatten", "--dtype", "float32",
        "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip


def test_rank_batches_are_disjoint_cover_every_row_and_keep_single_process_batches():
    for n, batch, size in [(37, 4, 2), (5, 8, 3), (100, 7, 4), (3, 1, 5)]:
        whole = batch_ranges(n, batch)
        shards = [rank_batches(n, batch, World(rank=r, size=size)) for r in range(size)]
        assert sorted(b for s in shards for b in s) == whole  # disjoint, complete, same batches as 1 process
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
        assert shards == [rank_batches(n, batch, World(rank=r, size=size)) for r in range(size)]


def test_assemble_refuses_a_journal_with_missing_batches(tmp_path):
    final = tmp_path / "train.h5"
    journal = store.Journal.open(final, {"m": 1})
    for start, stop in [(0, 2), (4, 6)]:  # rows 2-3 (another rank's batch) never committed
        journal.commit(start, {"x": np.ones((stop - start, 3), np.float32)}, [""] * (stop - start))
    assert journal.missing_rows(6) == [(2, 4)]
    with pytest.raises(FeaturecacheError, match="rows 2-3 were never committed"):
        store.assemble(
            final, journal=journal, taps=[store.TapColumn("x", 3, {"relative_depth": 1.0})], labels=[0] * 6,
            paths=[f"{i}.png" for i in range(6)], attrs={}, dtype="float32", compression="none",
        )  # fmt: skip
    assert not final.exists()
    with pytest.raises(FeaturecacheError, match="opened with other settings"):
        store.Journal.attach(final, {"m": 2})


def env_for(home: Path) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    # One thread per process on both sides: float32 matmuls round differently with another thread count
    # (~4e-6 on the 1280-d layer, the same between two single-process runs), which is not what we test.
    return {**os.environ, "FEATURECACHE_HOME": str(home), "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}


def single_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.extract", str(root), *ARGS, *extra]


def torchrun_cmd(root: Path, *extra: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "-m", "pipelines.extract", str(root), *ARGS, *extra]  # fmt: skip


def kill_rank_after(launcher: subprocess.Popen, partial: Path, *, shards: int, rank: int = 1) -> int | None:
    """SIGKILL torchrun's worker of ``rank`` once ``shards`` batches are committed (observed progress, no clock);
    returns its pid, or None if the launcher exited first."""

    def committed_and_found() -> bool:
        return (
            partial.is_dir()
            and len(list(partial.glob("rows-*.npz"))) >= shards
            and bool(worker_pid(launcher.pid, rank))
        )

    if not wait_until(committed_and_found, launcher, what=f"{shards} committed batches"):
        return None
    victim = worker_pid(launcher.pid, rank=rank)
    if victim is None:  # the worker exited between the two looks: the launcher is ending, nothing to kill
        return None
    os.kill(victim, signal.SIGKILL)
    return victim


def assert_same_cache(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in ("labels", "paths", "valid", "skipped/row"):
            np.testing.assert_array_equal(fa[name][:], fb[name][:])
        assert sorted(fa["features"]) == sorted(fb["features"])
        for key in fa["features"]:
            np.testing.assert_array_equal(fa["features"][key][:], fb["features"][key][:])  # same order, same values
        assert fa.attrs["config_fingerprint"] == fb.attrs["config_fingerprint"]
        assert fa.attrs["taps"] == fb.attrs["taps"]


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with ``RANK=rank`` (found through /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_two_gloo_ranks_write_the_single_process_cache_and_resume_after_a_rank_is_killed(tmp_path):
    root = make_image_folder(tmp_path / "tiny", per_class={"train": 14, "val": 3, "test": 3}, seed=3)
    add = root / "train" / "circle" / "zero.jpg"
    add.write_bytes(b"")  # a skipped row must land in the same place too
    ref_home, dist_home, kill_home = tmp_path / "ref", tmp_path / "dist", tmp_path / "kill"
    subprocess.run(single_cmd(root), env=env_for(ref_home), check=True, capture_output=True)
    ran = subprocess.run(torchrun_cmd(root), env=env_for(dist_home), capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "rank 1/2: extracting train:" in ran.stderr and "on 2 ranks" in ran.stdout
    for split in ("train", "val", "test"):
        assert_same_cache(
            Paths(ref_home).feature_file("tiny", BASE, split), Paths(dist_home).feature_file("tiny", BASE, split)
        )

    # Kill rank 1 once both ranks have committed batches; torchrun then stops rank 0 and fails the job.
    final = Paths(kill_home).feature_file("tiny", BASE, "train")
    partial = store.Journal.directory_for(final)
    total = len(batch_ranges(43, 2))
    launcher = subprocess.Popen(torchrun_cmd(root, "--splits", "train"), env=env_for(kill_home),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    victim = kill_rank_after(launcher, partial, shards=4)
    first_log = launcher.communicate(timeout=SAFETY_TIMEOUT_S)[0]
    print(first_log[-4000:])
    assert victim is not None, first_log[-3000:]
    assert launcher.returncode != 0 and not final.exists(), "a failed launch left a file under the final name"
    committed = len(list(partial.glob("rows-*.npz")))
    assert 4 <= committed < total

    again = subprocess.run(
        torchrun_cmd(root, "--splits", "train"), env=env_for(kill_home), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    redone = re.findall(r"rank \d/2: \w+ train: \d+ of \d+ batches already committed, (\d+) to do", again.stderr)
    assert len(redone) == 2 and sum(map(int, redone)) == total - committed, again.stderr[-3000:]
    # (only the batches missing after the failed launch are redone; committed shards are kept)
    assert not partial.exists()
    assert_same_cache(Paths(ref_home).feature_file("tiny", BASE, "train"), final)

    # With --max-restarts torchrun relaunches the ranks itself, and they resume from the journal.
    auto_home = tmp_path / "auto"
    final = Paths(auto_home).feature_file("tiny", BASE, "train")
    launcher = subprocess.Popen(torchrun_cmd(root, "--splits", "train", restarts=1), env=env_for(auto_home),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert kill_rank_after(launcher, store.Journal.directory_for(final), shards=4) is not None
    log = launcher.communicate(timeout=SAFETY_TIMEOUT_S)[0]
    assert launcher.returncode == 0, log[-3000:]
    assert "resuming train:" in log
    assert_same_cache(Paths(ref_home).feature_file("tiny", BASE, "train"), final)


def test_a_torchrun_rank_ends_without_finalizing_and_an_unexpected_error_still_shows(monkeypatch, capsys):
    # Finalizing the interpreter while gloo's threads free finished collectives aborts a rank (SIGABRT after its
    # work was done), so a rank leaves through os._exit with its status; a plain run exits as usual.
    import argparse
    import logging

    from pipelines.common import run_main

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # the test process keeps its log handlers

    def lost_peer(_args):
        raise RuntimeError("Connection closed by peer")

    def refused(_args):
        raise FeaturecacheError("no such base")

    args = argparse.Namespace()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_main(lambda _args: 0, args) == 0 and run_main(refused, args) == 2
    with pytest.raises(RuntimeError):
        run_main(lost_peer, args)
    assert exits == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for main in (lambda _args: 0, refused, lost_peer):
        run_main(main, args)
    assert exits == [0, 2, 1]
    err = capsys.readouterr().err
    assert "featurecache: error: no such base" in err and "RuntimeError: Connection closed by peer" in err
