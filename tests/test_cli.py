"""The console script: subcommands, one-line errors with exit status 2, no tracebacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import featurecache
from pipelines.cli import COMMANDS, run


def test_list_layers_marks_defaults(capsys):
    assert run(["list-layers", "efficientnet_lite0"]) == 0
    out = capsys.readouterr().out
    assert "* _blocks.4.add" in out and "40x28x28" in out and "  _conv_stem.conv2d" in out
    assert "default taps (--layers all-stages): _blocks.2.add,_blocks.4.add" in out


def test_list_heads_writes_grid_values_as_a_person_would(capsys):
    assert run(["list-heads"]) == 0
    out = capsys.readouterr().out
    assert "C=[1e-05, 0.0001, 0.001, 0.01, 0.1, 1]" in out and "multilayer" in out and "99999" not in out


def test_list_bases(capsys):
    assert run(["list-bases", "mobilenet*"]) == 0
    out = capsys.readouterr().out
    assert out.index("mobilenet_v2_offline") < out.index("mobilenet_v2 ")


def test_user_errors_are_one_line_without_traceback(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATURECACHE_HOME", str(tmp_path))
    assert run(["extract", str(tiny), "--base", "mobilenet_v2_offline", "--layers", "nope", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featurecache: error: layer 'nope' is not a node") and "Traceback" not in err
    assert run(["info", str(tmp_path / "missing.h5")]) == 2
    assert "run `featurecache extract`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--epochs", "0"], "--epochs 0: must be at least 1"),  # ran nothing, saved the frozen head, exit 0
        (["--patience", "-1"], "--patience -1: must be at least 1"),
        (["--lr-base", "-1"], "--lr-base -1.0: a learning rate must be positive"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),  # a ValueError traceback from DataLoader
        (["--workers", "-1"], "--workers -1: must be 0"),
        (["--max-batches", "0"], "--max-batches 0: must be at least 1"),  # 0 was read as "no limit"
    ],
)
def test_finetune_options_no_run_can_use_are_one_line_errors(option, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATURECACHE_HOME", str(tmp_path))
    assert run(["finetune", "--dataset", "shapes", "--no-progress", *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"featurecache: error: {expected}") and err.count("\n") == 1, err


def test_usage_errors_are_one_line_naming_help(capsys):
    for argv, expected in (
        (
            ["extract", ".", "--decode", "fast"],
            "argument --decode: invalid choice: 'fast' (choose from 'full', 'draft', 'gpu')",
        ),
        (["extract"], "the following arguments are required: dataset_root"),
        (["nope"], "argument COMMAND: invalid choice: 'nope'"),
        *(
            ([*command, "--seed", seed], f"argument --seed: {seed} is out of range; a seed is an integer from 0 to")
            for command in (["extract", "."], ["train-heads"], ["finetune", "--dataset", "d"])
            for seed in ("-1", str(2**32))
        ),
    ):
        with pytest.raises(SystemExit) as exited:
            run(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"featurecache: error: {expected}") and "--help`" in err, err


def test_extract_then_info(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATURECACHE_HOME", str(tmp_path))
    args = ["extract", str(tiny), "--base", "mobilenet_v2_offline", "--layers", "features.3", "--no-progress"]
    assert run([*args, "--workers", "0"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "data" / "features" / "tiny" / "mobilenet_v2_offline" / "test.h5"
    assert f"-> {path}" in out and "extracted" in out
    assert run(["info", str(path)]) == 0
    info = capsys.readouterr().out
    assert "6 samples" in info and "features.3" in info and "24x56x56" in info
    assert "runtime onnxruntime f32  decode full  orientation exif  alpha mean" in info  # the defaults on the CPU
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the README's relative paths, run outside the home
    relative = str(path.relative_to(tmp_path))
    assert run(["info", relative]) == 0 and "6 samples" in capsys.readouterr().out
    assert run(["verify", relative]) == 0
    assert run(["verify", "data/features/nope"]) == 2 and "here or under FEATURECACHE_HOME" in capsys.readouterr().err
    assert run(["info", "data/features/tiny"]) == 0  # a dataset's folder, as verify takes it: every cache below
    shown = capsys.readouterr().out
    assert shown.count("samples, ") == 3 and "3 classes (circle, square, stripes)" in shown


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exited:
        run(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^ {4}(\S+)", out, flags=re.MULTILINE)  # one line per subcommand, in order
    assert listed == list(COMMANDS)


def test_a_closed_pipe_ends_quietly():
    """``featurecache list-bases | head -1``: the reader goes away; no BrokenPipeError traceback, status 141."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "list-bases"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip
    proc.stdout.close()  # before the first write: the child's writes fail with EPIPE, deterministically
    err = proc.stderr.read()
    assert proc.wait() == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        run(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"featurecache {featurecache.__version__}\n"


def test_a_warning_during_a_progress_bar_starts_a_line_of_its_own(capsys):
    import argparse
    import logging
    import re

    from tqdm import tqdm

    from pipelines.common import run_main

    def main(args: argparse.Namespace) -> int:
        with tqdm(total=4, desc="extract") as bar:
            bar.update(2)
            logging.getLogger("featurecache.extract").warning("skipping broken.jpg")
            bar.update(2)
        return 0

    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers = []  # basicConfig inside run_main then installs its stderr handler, as in a fresh process
    try:
        assert run_main(main, argparse.Namespace(verbose=False)) == 0
    finally:
        root.handlers = handlers
    err = capsys.readouterr().err
    (line,) = [part for part in re.split(r"[\r\n]", err) if "skipping broken.jpg" in part]
    assert re.match(r"\d\d:\d\d:\d\d WARNING featurecache\.extract: skipping broken\.jpg$", line.strip()), err


def test_compare_layers_reads_images_with_every_option_extract_has_for_them():
    from pipelines import compare_layers, extract
    from pipelines.common import extract_options

    argv = ["--alpha", "white", "--orientation", "ignore", "--decode", "draft", "--runtime", "eager",
            "--device", "cpu", "--batch-size", "4"]  # fmt: skip
    by_extract = extract_options(extract.get_args_parser().parse_args(["photos", *argv]))
    by_compare = extract_options(compare_layers.get_args_parser().parse_args(["photos", *argv]))
    assert by_compare == by_extract and (by_compare.alpha, by_compare.runtime, by_compare.batch_size) == (
        "white",
        "eager",
        4,
    )
