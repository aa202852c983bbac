"""Contrastive image–text (CLIP) training for MWM: ``mwm clip train``.

* :func:`train_clip` with :class:`ClipTrainConfig` — train a small CLIP from scratch or
  fine-tune a pretrained one;
* :mod:`mwm.clip.model` — scratch presets, model loading, the saved folder format
  (:func:`load_clip` loads a trained folder with open_clip, ``local-dir:``);
* :mod:`mwm.clip.losses` — symmetric InfoNCE and DHN-NCE.

See ``docs/clip-training.md``.
"""

from ..errors import ModelLoadError
from .losses import LOSSES, dhn_nce_loss, infonce_loss, same_caption_matrix
from .model import PRESETS, build_model, load_clip, save_model_folder, scratch_config
from .train import ClipTrainConfig, ClipTrainSummary, train_clip

__all__ = ["LOSSES", "PRESETS", "ClipTrainConfig", "ClipTrainSummary", "ModelLoadError",
           "build_model", "dhn_nce_loss", "infonce_loss", "load_clip", "same_caption_matrix",
           "save_model_folder", "scratch_config", "train_clip"]
