"""Downstream tasks on top of a pretrained MWM encoder, registered by name in
:data:`mwm.downstream.tasks.TASKS`.

* :mod:`.classify` — image classification: shared setup and evaluation, with
  :mod:`.full_finetune` (layer-wise lr decay) and :mod:`.linear_probe` (frozen encoder);
  tasks ``finetune`` and ``linear-probe``;
* :mod:`.classify_metrics` — accuracy, balanced accuracy, macro-F1, exact one-vs-rest
  AUROC and confusion matrices;
* :mod:`.detect` with :mod:`.coco` — detection / instance segmentation (Mask R-CNN), task
  ``detect``;
* :mod:`.segment` — semantic segmentation (UNet decoder on a CNN encoder's pyramid),
  tasks ``segment`` and ``segment-probe``;
* :mod:`.weights` — reading every kind of encoder weights, strict loading;
* :mod:`.convert` — encoder weights in timm / torchvision / Detectron2 key spaces;
* :mod:`.vit` — Vision Transformers: MAE layer ids, position embeddings resampled to
  another input size, the simple feature pyramid for detection.

Importing the package registers its tasks.
"""

from . import classify, detect, segment  # noqa: F401  (their tasks register on import)
from .tasks import TASKS, EvalTask

__all__ = ["TASKS", "EvalTask"]
