"""The output-folder rule of every command, stage outputs read from manifests, threads."""

import json

import numpy as np
import pytest

from mwm.cli import main
from mwm.files import write_png
from mwm.runlog import MANIFEST_NAME, RunManifest, claim_folder


def own_folder(path, command, outputs=None, config=None):
    """A folder as ``mwm <command>`` leaves it: its manifest (with listed outputs)."""
    manifest = RunManifest(path, command, config or {})
    if outputs is not None:
        manifest.add(outputs=outputs)
    with manifest:
        pass
    return path


def user_folder(path, name="holiday.png"):
    path.mkdir(parents=True, exist_ok=True)
    write_png(path / name, np.full((8, 8), 7, np.uint8))
    return path / name


def test_new_empty_hidden_only_and_own_folders_are_accepted(tmp_path):
    assert claim_folder(tmp_path / "new", "localize") is None
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_text("x")
    assert claim_folder(tmp_path / "hidden", "localize") is None
    own_folder(tmp_path / "own", "localize")
    assert claim_folder(tmp_path / "own", "localize")["command"] == "localize"


def test_a_folder_with_only_other_shards_is_new_to_the_main_shard(tmp_path):
    """Two shards started at once: shard 1 may create shards/1/ before shard 0 claims the
    folder; anything else beside the shards, or a shard folder of another command, is not."""
    from mwm.runlog import holds_only_shards

    run = tmp_path / "run"
    assert not holds_only_shards(run, "experiment")  # missing: the ordinary rule applies
    own_folder(run / "shards" / "1", "experiment")
    (run / "shards" / "2").mkdir()               # a shard that has not written yet
    assert holds_only_shards(run, "experiment")
    assert not holds_only_shards(run, "pretrain")
    user_folder(run, "notes.png")
    assert not holds_only_shards(run, "experiment")
    (run / "notes.png").unlink()
    user_folder(run / "shards" / "3")            # not a shard's own files
    assert not holds_only_shards(run, "experiment")


@pytest.mark.parametrize("argv", [
    ["localize", "IMAGES", "--out", "OUT", "--prompt", "tumor", "--model", "no-such-model"],
    ["postprocess", "IMAGES", "--out", "OUT"],
    ["phantoms", "OUT", "--n", "4", "--size", "32"],
    ["evaluate", "IMAGES", "IMAGES", "--out", "OUT"],
    ["pretrain", "IMAGES", "--out", "OUT"],
    ["inspect", "IMAGES", "--out", "OUT"],
])
def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path, capsys, argv):
    images = tmp_path / "images"
    write_png(images / "a.png", np.full((16, 16), 100, np.uint8))
    stray = user_folder(tmp_path / "out", "a.png")
    before = stray.read_bytes()
    (tmp_path / "out" / "labels.csv").write_text("mine\n")
    argv = [str(images) if a == "IMAGES" else str(tmp_path / "out") if a == "OUT" else a
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "out") in err and "--overwrite" in err and "no MWM command" in err
    assert stray.read_bytes() == before
    assert (tmp_path / "out" / "labels.csv").read_text() == "mine\n"
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_another_commands_folder_is_refused_and_named(tmp_path, capsys):
    own_folder(tmp_path / "maps", "localize")
    assert main(["phantoms", str(tmp_path / "maps"), "--n", "4"]) == 2
    assert "`mwm localize`" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["phantoms", str(tmp_path / "file"), "--n", "4"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_phantoms_rewrite_their_own_folder_only_with_the_same_settings(tmp_path, capsys):
    out = str(tmp_path / "ph")
    args = ["phantoms", out, "--n", "6", "--size", "32", "--quiet"]
    assert main(args) == 0
    assert main(args) == 0  # the same set again: the same files
    assert main(["phantoms", out, "--n", "4", "--size", "32", "--quiet"]) == 2
    assert "n: 6 → 4" in capsys.readouterr().err
    assert main(["phantoms", out, "--n", "4", "--size", "32", "--quiet", "--overwrite"]) == 0


@pytest.mark.parametrize("command, checkpoint", [
    ("pretrain", "checkpoint.pt"), ("finetune", "last.pt"), ("detect", "checkpoint.pt")])
def test_a_finished_training_run_is_continued_only_on_request(tmp_path, capsys, command,
                                                              checkpoint):
    run = own_folder(tmp_path / "run", command)
    (run / checkpoint).write_bytes(b"the finished run")
    assert main([command, str(tmp_path / "data"), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--resume auto" in err and str(run / checkpoint) in err
    assert (run / checkpoint).read_bytes() == b"the finished run"


def test_postprocess_reads_only_the_maps_localize_listed(tmp_path, capsys):
    maps = own_folder(tmp_path / "maps", "localize", outputs=["a.png", "gone.png"])
    ramp = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    write_png(maps / "a.png", ramp)
    user_folder(maps, "holiday.png")
    code = main(["postprocess", str(maps), "--out", str(tmp_path / "masks"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1  # the listed map that is missing
    assert "holiday.png" in captured.err and "gone" in captured.err
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == ["a.png"]
    manifest = json.loads((tmp_path / "masks" / MANIFEST_NAME).read_text())
    assert manifest["results"]["outputs"] == ["a.png"]


def test_evaluate_ignores_strays_in_a_postprocess_folder(tmp_path):
    from mwm.localize.evaluate import evaluate_folders

    gt = tmp_path / "gt"
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    write_png(gt / "a.png", mask)
    pred = own_folder(tmp_path / "pred", "postprocess", outputs=[])
    write_png(pred / "a.png", mask)  # not listed: not this stage's prediction
    summary = evaluate_folders(pred, gt, tmp_path / "eval", progress=False)
    assert summary["n_missing"] == 1


def test_export_and_report_replace_only_their_own_files(tmp_path, capsys):
    from mwm.pretrain.export import export_encoder, is_export
    import torch

    foreign = tmp_path / "weights.safetensors"
    foreign.write_bytes(b"someone else's file")
    assert not is_export(foreign)
    assert main(["export", str(tmp_path / "enc.safetensors"), "--out", str(foreign)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    export_encoder({"w": torch.zeros(2)}, tmp_path / "mine.safetensors", arch="resnet18")
    assert is_export(tmp_path / "mine.safetensors")
    run = own_folder(tmp_path / "run", "demo")
    (tmp_path / "page.html").write_text("<html>my notes</html>")
    assert main(["report", str(run), "--out", str(tmp_path / "page.html")]) == 2
    assert (tmp_path / "page.html").read_text() == "<html>my notes</html>"


def test_threads_default_to_the_usable_cores_and_follow_the_flag(monkeypatch):
    import torch

    from mwm import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 1)
    before = torch.get_num_threads()
    try:
        assert runtime.configure_process(flush_denormal=False) == 1
        assert torch.get_num_threads() == 1
        assert runtime.configure_process(threads=2, flush_denormal=False) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_busy_cores_are_reported(monkeypatch, capsys):
    from mwm import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.9, 1.0, 0.5))
    assert runtime.warn_if_busy("mwm demo")
    assert "--threads 1" in capsys.readouterr().err
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert not runtime.warn_if_busy("mwm demo")


def test_every_command_takes_threads_and_overwrite(capsys):
    from mwm.cli.commands import COMMANDS

    for cmd in COMMANDS:
        with pytest.raises(SystemExit):
            main([*cmd.name.split(), "--help"])
        text = capsys.readouterr().out
        assert "--threads" in text and "--overwrite" in text, cmd.name
