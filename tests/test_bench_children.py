"""The extraction bench's child protocol (benchmarks/extraction.py): one RESULT line back, a failure with its stderr.

Not a timing test: only that a child runs, reports and fails loudly, so `make bench` does not break unseen.
"""

from __future__ import annotations

import pytest

from benchmarks.extraction import _child, make_photos


def test_a_child_reports_its_figures_and_a_failing_one_raises_with_its_stderr(tmp_path):
    root = make_photos(tmp_path / "photos", 4)
    result = _child("decode", {"root": root, "work": tmp_path / "home", "images": 4})
    assert set(result) == {"decode_ms", "normalize_ms"} and result["decode_ms"] > 0 < result["normalize_ms"]
    tensor = _child("tensor", {"root": root, "work": tmp_path / "home", "images": 4})
    assert set(tensor) == {"pil_ms", "tensor_ms", "max_diff", "differ"} and tensor["max_diff"] <= 2
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit \d+\).*unknown --runtime 'nonsense'"):
        _child("bare", {"root": root, "work": tmp_path / "home", "runtime": "nonsense", "images": 4})


def test_the_gpu_section_says_it_is_skipped_without_cuda_and_its_children_run(tmp_path, capsys, monkeypatch):
    """The GPU bench is prepared for a session that has a GPU: its children run here on the CPU (resnet50, batch
    256), and --decode gpu is refused there in its one line."""
    import torch

    from benchmarks.gpu import bench_gpu, gpu_jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu(tmp_path, report=None) is None
    assert "gpu        skipped: no CUDA device here" in capsys.readouterr().out
    jobs = gpu_jobs(tmp_path, device="cpu", images=4)
    split, bare = _child(*jobs["split"]), _child(*jobs["bare"])
    assert split["whole"] > 0 < bare["img_s"] and split["runtime"] == "eager" and bare["batch"] == 256
    with pytest.raises(RuntimeError, match=r"--decode gpu decodes JPEGs with nvjpeg on a CUDA device"):
        _child(*jobs["split-gpu"])
