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
    draft = _child("draft", {"root": root, "work": tmp_path / "home", "images": 4})
    assert set(draft) == {"full_ms", "draft_ms", "mean_diff", "max_diff"}
    assert draft["max_diff"] == 0  # 320x240 photos are below the 256 target: draft decodes them in full
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit \d+\).*unknown --runtime 'nonsense'"):
        _child("bare", {"root": root, "work": tmp_path / "home", "runtime": "nonsense", "images": 4})


def test_the_gpu_section_says_it_is_skipped_without_cuda_and_its_children_run(tmp_path, capsys, monkeypatch):
    """The GPU bench is prepared for a session that has a GPU: its children run here on the CPU (resnet50, batch
    256); the --decode gpu child is the split child with that flag (its refusal on the CPU: test_gpu_decode.py)."""
    import torch

    from benchmarks.gpu import bench_gpu, gpu_jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu(tmp_path, report=None) is None
    assert "gpu        skipped: no CUDA device here" in capsys.readouterr().out
    jobs = gpu_jobs(tmp_path, device="cpu", images=4)
    split, bare = _child(*jobs["split"]), _child(*jobs["bare"])
    assert split["whole"] > 0 < bare["img_s"] and split["runtime"] == "eager" and bare["batch"] == 256
    assert jobs["split-gpu"] == ("split", {**jobs["split"][1], "decode": "gpu"})  # refused on the CPU: not run here


def test_the_gpu_section_reports_each_figure_from_the_medians_of_its_rounds(tmp_path, monkeypatch):
    """bench_gpu's rounds, medians and report lines, with the children stood in for (no GPU here)."""
    import torch

    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a stand-in GPU")
    monkeypatch.setattr(gpu, "gpu_jobs", lambda work: {key: (key, {}) for key in ("split", "split-gpu", "bare")})
    figures = {"split": [{"whole": w, "loop": 1000.0, "runtime": "eager"} for w in (900.0, 950.0, 990.0, 100.0)],
               "split-gpu": [{"whole": w, "loop": 1100.0, "runtime": "eager"} for w in (990.0, 980.0, 970.0, 0.0)],
               "bare": [{"img_s": b} for b in (1000.0, 1000.0, 1000.0, 1.0)]}  # fmt: skip
    monkeypatch.setattr(gpu, "_child", lambda mode, flags: figures[mode].pop())  # the warm-up takes the last
    reported = []
    gpu.bench_gpu(tmp_path, lambda *row: reported.append(row))
    rows = {name: (value, ok) for _, name, value, _, ok, *_ in reported}
    assert rows["bare forward img/s"][0] == 1000.0
    assert rows["end-to-end / bare forward (PIL decode)"] == (0.95, True)  # the median of 0.90, 0.95, 0.99
    assert rows["end-to-end / bare forward (--decode gpu)"] == (0.98, True)
    assert rows["forward loop alone / bare forward (--decode gpu)"][0] == 1.1


def test_the_coverage_bench_compares_both_intervals_on_the_same_simulated_test_sets():
    from benchmarks.paired_interval import coverage

    small = coverage(15, 0.95, 0.90, 0.5, trials=60)
    assert set(small) == {"newcombe_coverage", "bootstrap_coverage", "newcombe_zero", "bootstrap_zero"}
    assert small["newcombe_zero"] == 0 < small["bootstrap_zero"]  # the bootstrap collapses on 15 images
    assert coverage(15, 0.95, 0.90, 0.5, trials=60) == small  # seeded: the same figures every run
