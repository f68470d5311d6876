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
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit \d+\).*unknown --runtime 'nonsense'"):
        _child("bare", {"root": root, "work": tmp_path / "home", "runtime": "nonsense", "images": 4})
