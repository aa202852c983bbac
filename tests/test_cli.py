"""The command line: help, version, config files with overrides, manifests, exit codes."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from mwm import __version__
from mwm.cli import build_parser, main, parse_args
from mwm.files import safe_child, write_json


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mwm", *args], capture_output=True, text=True,
                          timeout=120)


def command_names():
    for action in build_parser()._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return sorted(action.choices)
    return []


def commands():
    """Every command, a group's actions included ("clip train")."""
    from mwm.cli.commands import COMMANDS

    return [c.name for c in COMMANDS]


def test_version_and_help():
    out = run_cli("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    out = run_cli("--help")
    assert out.returncode == 0
    for name in command_names():
        assert name in out.stdout


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*name.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "--quiet" in text


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "phantoms" in capsys.readouterr().out


def test_config_file_supplies_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n: 12\nsize: 64\nbit-depth: 16\nmodality: chest-ct\n")
    args = parse_args(["phantoms", str(tmp_path / "o"), "--config", str(cfg), "--size", "96"])
    assert (args.n, args.size, args.bit_depth, args.modality) == (12, 96, 16, "chest-ct")


@pytest.mark.parametrize("content,match", [
    ("sizes: 64\n", "unknown option.*sizes"),
    ("modality: knee\n", "not one of"),
    ("n: many\n", "n = 'many'"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_bad_config_files_are_clear_errors(tmp_path, capsys, content, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    assert main(["phantoms", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml" in err
    import re
    assert re.search(match, err), err


def test_missing_positional_is_a_clear_error(capsys):
    assert main(["phantoms"]) == 2
    assert "missing OUT" in capsys.readouterr().err


def test_inspect_reports_every_failure_and_exits_nonzero(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a", "b", "c"):
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.full((8, 8), 255, np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "b.png"), np.zeros((4, 4), np.uint8))  # wrong size
    (tmp_path / "images" / "c.png").write_bytes(b"garbage")                      # unreadable
    out = tmp_path / "report"
    code = main(["inspect", str(tmp_path), "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 1
    assert "3 images, 1 readable, 2 failed" in text
    assert "b.png" in text and "c.png" in text
    summary = json.loads((out / "inspect_summary.json").read_text())
    assert summary["failures"] == 2 and summary["with_mask"] == 1
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["command"] == "inspect" and manifest["status"] == "ok"
    assert manifest["packages"]["torch"] and manifest["end_time"]


def test_safe_child_refuses_escapes(tmp_path):
    assert safe_child(tmp_path, "a/b.png") == (tmp_path / "a" / "b.png").resolve()
    for bad in ("../x.png", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="leave the output folder"):
            safe_child(tmp_path, bad)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_json(tmp_path / "a.json", {"x": np.int64(3), "y": np.float32(0.5)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3, "y": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
