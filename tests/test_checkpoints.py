"""Unusable checkpoint and weights files: one safe reader, plain messages, exit status 2.

Every reader of a torch or safetensors file (``--resume`` of pretrain / finetune / detect /
clip train, ``--weights``, ``mwm export``) goes through :mod:`mwm.checkpoint`; a bad file
is a DataError naming it, never a traceback, never PyTorch's advice to unpickle it unsafely.
"""

from __future__ import annotations

import types

import pytest
import torch

from mwm import checkpoint
from mwm.cli import main
from mwm.errors import DataError

ARCH = "resnet10t"


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _good_checkpoint(path):
    torch.save({"model": {"w": torch.zeros(64, 64)}, "optimizer": {}, "step": 1, "epoch": 0,
                "config": {"masking": "random"}, "mean": [0.5] * 3, "std": [0.2] * 3}, path)
    return path


def _bad_files(tmp_path) -> dict:
    """name → (path, words the message must hold)."""
    good = _good_checkpoint(tmp_path / "good.pt").read_bytes()
    files = {"truncated": (good[: len(good) // 2], "truncated"), "empty": (b"", "empty"),
             "random": (b"a text file, not a checkpoint\n" * 50, "not a PyTorch file")}
    out = {}
    for name, (data, words) in files.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        out[name] = (path, words)
    return out


def _assert_plain(err: pytest.ExceptionInfo, path, words: str) -> None:
    message = str(err.value)
    assert str(path) in message and words in message
    assert "weights_only" not in message and "Traceback" not in message


@pytest.mark.parametrize("name", ["truncated", "empty", "random"])
def test_unreadable_files_name_the_file(tmp_path, name):
    path, words = _bad_files(tmp_path)[name]
    with pytest.raises(DataError) as err:
        checkpoint.load(path, "checkpoint.pt")
    _assert_plain(err, path, words)
    with pytest.raises(DataError) as err:
        checkpoint.read(tmp_path, "--resume")  # a folder where a file is needed
    _assert_plain(err, tmp_path, "folder")


def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path):
    live, marker = tmp_path / "live.pt", tmp_path / "MARKER"
    torch.save({"model": Payload(live)}, live)
    torch.load(live, weights_only=False)  # the payload is live: unsafe loading runs it
    assert live.is_file()
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Payload(marker)}, path)
    with pytest.raises(DataError) as err:
        checkpoint.load(path, "checkpoint.pt")
    _assert_plain(err, path, "refuses to unpickle")
    assert "could run code" in str(err.value) and not marker.exists()


def test_wrong_content_names_what_the_file_is_and_the_missing_keys(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(DataError, match=r"state dict of 1 tensors.*lacks model, optimizer"):
        checkpoint.load(weights, "checkpoint.pt", kind="pretrain")
    finetune_ck = tmp_path / "last.pt"
    torch.save({"format": "mwm-finetune", "model": {}, "optimizer": {}, "step": 1,
                "epoch": 1, "config": {}, "classes": ["a", "b"]}, finetune_ck)
    with pytest.raises(DataError, match="is an MWM fine-tune checkpoint, not an MWM pretraining"):
        checkpoint.load(finetune_ck, "checkpoint.pt", kind="pretrain")
    best = tmp_path / "best.pt"
    torch.save({"format": "mwm-finetune", "model": {}, "step": 1, "epoch": 1, "config": {},
                "classes": ["a"]}, best)
    with pytest.raises(DataError, match=r"lacks optimizer\. .*best\.pt holds no training state"):
        checkpoint.load(best, "last.pt", kind="finetune")
    with pytest.raises(DataError, match=r"holds a Tensor"):
        torch.save(torch.zeros(3), tmp_path / "t.pt")
        checkpoint.read(tmp_path / "t.pt", "--resume", kind="detect")


def test_detect_and_clip_resume_use_the_safe_reader(tmp_path):
    from mwm.clip.train import _ClipRun
    from mwm.downstream.detect import DetectConfig, _load_resume

    path, words = _bad_files(tmp_path)["truncated"]
    with pytest.raises(DataError) as err:
        _load_resume(DetectConfig(data=str(tmp_path), out=str(tmp_path / "d"), resume=str(path)))
    _assert_plain(err, path, words)
    evil, marker = tmp_path / "checkpoint.pt", tmp_path / "MARKER"
    torch.save({"x": Payload(marker)}, evil)
    with pytest.raises(DataError) as err:
        _ClipRun._restore(types.SimpleNamespace(), evil)  # fails before it reads the run
    _assert_plain(err, evil, "refuses to unpickle")
    assert not marker.exists()


def _export(path, arch=ARCH, **extra):
    import timm

    from mwm.pretrain.export import export_encoder

    export_encoder(timm.create_model(arch, num_classes=0), path, arch=arch, extra_metadata=extra)
    return path


def test_weights_readers_refuse_bad_files_by_name(tmp_path):
    from mwm.downstream.convert import load_timm_state
    from mwm.downstream.weights import read_weights

    full = _export(tmp_path / "full.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full[: len(full) // 2])
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"a text file, not safetensors\n" * 20)
    evil, marker = tmp_path / "evil.pth", tmp_path / "MARKER"
    torch.save({"state_dict": Payload(marker)}, evil)
    for reader in (read_weights, load_timm_state):
        for path, words in ((cut, "truncated"), (fake, "not a safetensors file"),
                            (evil, "refuses to unpickle")):
            with pytest.raises(DataError) as err:
                reader(path)
            _assert_plain(err, path, words)
    assert not marker.exists()


def test_architecture_mismatch_names_the_architecture_to_pass(tmp_path):
    import timm

    from mwm.downstream.weights import load_weights, read_weights

    path = _export(tmp_path / "enc.safetensors", input_size=64, masking="region")
    state, meta, _ = read_weights(path)
    expected = (rf"{path} holds a {ARCH} encoder \(input size 64, masking region\) but --model "
                rf"is resnet18; pass --model {ARCH} \(the keys differ — missing keys")
    for given in (meta, None):  # passed, or read again from the file named by source
        with pytest.raises(DataError, match=expected):
            load_weights(timm.create_model("resnet18", num_classes=2), state, source=str(path),
                         meta=given)
    plain = tmp_path / "plain.pt"  # records no architecture: the key list as before
    torch.save(state, plain)
    with pytest.raises(DataError, match=r"do not match the encoder 'resnet18' — missing keys"):
        load_weights(timm.create_model("resnet18", num_classes=2), state, source=str(plain))


# --------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from mwm.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, n=12, size=32, workers=1, progress=False)
    return out


def _run(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_resume_with_a_bad_checkpoint_exits_2(tmp_path, phantoms, capsys):
    path, _ = _bad_files(tmp_path)["truncated"]
    common = ["--resume", str(path), "--device", "cpu", "--model", ARCH, "--input-size", "32"]
    code, err = _run(capsys, ["pretrain", str(phantoms), "--out", str(tmp_path / "p"),
                              "--masking", "random", *common])
    assert code == 2 and f"mwm pretrain: error: --resume {path}: the file is truncated" in err
    assert "Traceback" not in err
    code, err = _run(capsys, ["finetune", str(phantoms), "--out", str(tmp_path / "f"), *common])
    assert code == 2 and f"mwm finetune: error: --resume {path}: the file is truncated" in err
    torch.save({"w": torch.zeros(2)}, path)  # readable, but no training checkpoint
    code, err = _run(capsys, ["finetune", str(phantoms), "--out", str(tmp_path / "g"), *common])
    assert code == 2 and "lacks model, optimizer" in err
    assert not any(p.suffix == ".pt" for p in (tmp_path / "g").rglob("*"))  # nothing trained


def test_cli_detect_and_export_with_bad_files_exit_2(tmp_path, capsys):
    path, _ = _bad_files(tmp_path)["random"]
    code, err = _run(capsys, ["detect", str(tmp_path), "--out", str(tmp_path / "d"),
                              "--resume", str(path), "--device", "cpu"])
    assert code == 2 and f"--resume {path}: not a PyTorch file" in err
    code, err = _run(capsys, ["export", str(path), "--out", str(tmp_path / "x.pth")])
    assert code == 2 and f"{path}: not a PyTorch file" in err
    assert not (tmp_path / "x.pth").exists()


def test_detectron2_reader_refuses_a_payload(tmp_path):
    import pickle

    import numpy as np

    from mwm.downstream.convert import read_detectron2

    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"model": {"w": np.ones(3, np.float32)}}, protocol=5))
    assert np.array_equal(read_detectron2(good)["model"]["w"], np.ones(3))
    evil, marker = tmp_path / "evil.pkl", tmp_path / "MARKER"
    evil.write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(DataError) as err:
        read_detectron2(evil)
    _assert_plain(err, evil, "refuses to unpickle")
    assert not marker.exists()
