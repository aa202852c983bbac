"""Contrastive image–text (CLIP) training for MWM: ``mwm clip train``.

* :func:`train_clip` — train a small CLIP from scratch or fine-tune a pretrained one;
* :mod:`mwm.clip.losses` — symmetric InfoNCE and DHN-NCE;
* :func:`load_clip` — load a trained folder with open_clip (``local-dir:``).

See ``docs/clip-training.md``.
"""

from .losses import LOSSES, dhn_nce_loss, infonce_loss, same_caption_matrix
from .train import (PRESETS, ClipTrainSummary, ModelLoadError, build_model, load_clip,
                    save_model_folder, scratch_config, train_clip)

__all__ = ["LOSSES", "PRESETS", "ClipTrainSummary", "ModelLoadError", "build_model",
           "dhn_nce_loss", "infonce_loss", "load_clip", "same_caption_matrix",
           "save_model_folder", "scratch_config", "train_clip"]
