"""What the documentation promises is checked: every row of docs/bad-inputs.md names a
test that exists, and README / --help say the same about the demo."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_bad_input_row_names_an_existing_test():
    text = (ROOT / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines()
            if line.startswith("|") and not line.startswith(("| input", "| ---", "|---"))]
    assert len(rows) > 40
    for row in rows:
        refs = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row.rsplit("|", 2)[-2])
        assert refs, f"row without a test: {row[:80]}"
        for module, name in refs:
            source = (ROOT / "tests" / module).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.M), f"{module}::{name} is missing"


def test_readme_and_demo_help_give_the_same_duration():
    from mwm.demo import DemoConfig
    from mwm.config import flag_name  # noqa: F401 - the help text is the field's

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    help_text = DemoConfig.__doc__ or ""
    stated = re.search(r"mwm demo --out mwm-demo\s+# about (\d+) minutes", readme)
    assert stated, "README's demo line lost its duration"
    assert f"about {stated.group(1)} minutes" in (help_text + _demo_help())


def _demo_help():
    from mwm.cli.commands import COMMANDS

    return next(c.help for c in COMMANDS if c.name == "demo")


def test_published_nsd_is_said_to_differ():
    """MWM's NSD counts the 2-D boundary (36 pixels of a 10x10 square) where the reference's
    one-slice 3-D surface counts the whole area; the metrics doc says so."""
    import numpy as np

    from mwm.metrics import nsd

    square = np.zeros((20, 20), bool)
    square[5:15, 5:15] = True
    shifted = np.roll(square, 3, axis=1)
    # boundary-only counting: 2 x 36 boundary pixels, of which those within 1 px match
    assert 0 < nsd(square, shifted, tolerance_px=1) < 1
    doc = (ROOT / "docs" / "postprocess-and-metrics.md").read_text(encoding="utf-8")
    assert "not comparable" in doc and "242" in doc and "--no-fill" in doc


@pytest.mark.parametrize("command, flags", [
    ("pretrain", ("--epochs", "--input-size", "--batch-size")),
    ("finetune", ("--epochs", "--input-size", "--batch-size")),
    ("detect", ("--epochs", "--input-size", "--batch-size")),
    ("clip train", ("--epochs", "--batch-size"))])
def test_training_help_shows_the_size_defaults(command, flags, capsys):
    from mwm.cli import main

    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in flags:
        assert re.search(rf"{flag} \S+ .*?\(default: \d+\)", text), (command, flag)
