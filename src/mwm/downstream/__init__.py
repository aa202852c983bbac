"""Downstream tasks on top of a pretrained MWM encoder.

* :mod:`mwm.downstream.classify` — image classification: full fine-tuning with
  layer-wise learning-rate decay, or linear probing of the frozen encoder
  (``mwm finetune``);
* :mod:`mwm.downstream.classify_metrics` — accuracy, balanced accuracy, macro-F1,
  exact one-vs-rest AUROC and confusion matrices;
* :mod:`mwm.downstream.convert` — encoder weights in timm / torchvision / Detectron2
  key spaces;
* :mod:`mwm.downstream.detect` — detection / instance segmentation (Mask R-CNN).
"""
