"""Every argument of ``equiproj bench`` / ``demo`` / ``verify`` is checked before any work: a bad value
ends with argparse's message and exit status 2 (nothing runs)."""

from __future__ import annotations

import os

import pytest

from equiproj.cli import _args
from equiproj.cli import bench
from equiproj.cli import _demo as demo
from equiproj.cli import main


@pytest.fixture
def no_work(monkeypatch):
    """Any benchmark or demo work fails the test: the arguments must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(bench, "run_suite", refuse)
    monkeypatch.setattr(bench, "available_backends", refuse)
    monkeypatch.setattr(demo, "_experiment", refuse)


def _exit_status(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("keys", ["nosuch", "mlp,nosuch", ",", ""])
def test_unknown_layer_keys(keys, capsys, no_work):
    code, err = _exit_status(["bench", "--quick", "--layers", keys], capsys)
    assert code == 2 and "--layers" in err
    assert "mlp,c8conv,o3conv,large" in err  # the valid keys
    if keys.strip(","):
        assert "nosuch" in err


def test_layer_keys_are_checked_by_the_suite_too():
    with pytest.raises(ValueError, match="nosuch"):
        bench.suite(bench.Settings.for_mode("quick", layers=("mlp", "nosuch")))
    assert [L.key for L in bench.suite(bench.Settings.for_mode("quick", layers=("mlp",)))] == ["mlp"]


def test_output_paths(tmp_path, capsys, no_work, monkeypatch):
    missing = str(tmp_path / "nosuch" / "x.json")
    code, err = _exit_status(["bench", "--quick", "--json", missing], capsys)
    assert code == 2 and "--json" in err and "does not exist" in err
    code, err = _exit_status(["bench", "--quick", "--json", str(tmp_path)], capsys)  # a folder
    assert code == 2 and "folder" in err
    code, err = _exit_status(["bench", "--quick", "--plot", str(tmp_path / "nosuch" / "t.png")], capsys)
    assert code == 2 and "--plot" in err and "does not exist" in err
    code, err = _exit_status(["bench", "--quick", "--plot", str(tmp_path / "t.jpg")], capsys)
    assert code == 2 and ".png" in err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    code, err = _exit_status(["bench", "--quick", "--json", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "not writable" in err


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--device", "cuda:x"], ["--device", ""],
                                  ["--dense-max-gib", "-1"], ["--dense-max-gib", "0"], ["--dense-max-gib", "nan"],
                                  ["--dense-max-gib", "inf"], ["--dense-max-gib", "lots"], ["--seed", "-1"],
                                  ["--seed", "1.5"], ["--seed", str(2**63)]])
def test_bad_bench_values(argv, capsys, no_work):
    code, err = _exit_status(["bench", "--quick", *argv], capsys)
    assert code == 2 and argv[0] in err


@pytest.mark.parametrize("argv", [["--threads", "-1"], ["--threads", "0"], ["--threads", "two"], ["--seed", "-3"]])
def test_bad_demo_values(argv, capsys, no_work):
    code, err = _exit_status(["demo", "--only", "so2", *argv], capsys)
    assert code == 2 and argv[0] in err


def test_demo_output_folder(tmp_path, capsys, no_work):
    a_file = tmp_path / "f.txt"
    a_file.write_text("")
    code, err = _exit_status(["demo", "--only", "so2", "--out", str(a_file)], capsys)
    assert code == 2 and "not a folder" in err
    assert _args.output_dir(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")  # created later


def test_experiment_scripts_check_their_arguments(capsys, no_work):
    with pytest.raises(SystemExit) as e:
        demo.script_main(["--threads", "-2"], "so2", "the SO(2) toy")
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def test_argument_types_accept_good_values():
    assert _args.device("cpu") == "cpu" and _args.device("cuda") == "cuda" and _args.device("cuda:1") == "cuda:1"
    assert _args.positive_float("0.5") == 0.5 and _args.positive_int("3") == 3 and _args.seed("0") == 0
    assert _args.key_list(("a", "b"))(" b, a ") == ("b", "a")


def test_help_says_what_the_exit_status_means(capsys):
    for command in ("bench", "verify"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert e.value.code == 0
        assert "0 every verification passed" in out and "1 a verification failed" in out and "2 bad arguments" in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "missed timing target" in out and "does not change it" in out and "quick" in out and "noisy" in out
