"""SAM refinement with a tiny random-weights transformers SamModel."""

import cv2
import numpy as np
import pytest

from mwm.localize.hub import ModelUnavailableError
from mwm.localize.refine import SamRefiner, refine_folder


def tiny_sam(size=64):
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel,
                              SamProcessor, SamPromptEncoderConfig, SamVisionConfig)
    import torch

    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2,
                             num_attention_heads=2, image_size=size, patch_size=8, window_size=4,
                             global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=size, patch_size=8)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                                   num_attention_heads=2, iou_head_hidden_dim=32)
    model = SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                               mask_decoder_config=decoder.to_dict()))
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": size},
                                               pad_size={"height": size, "width": size}))
    return SamRefiner(model, processor)


class SpyProcessor:
    """Records the boxes SAM is prompted with."""

    def __init__(self, inner):
        self.inner, self.boxes = inner, []
        self.image_processor = inner.image_processor

    def __call__(self, **kwargs):
        self.boxes.append(kwargs["input_boxes"])
        return self.inner(**kwargs)


def test_one_box_per_component_and_image_sized_output():
    refiner = tiny_sam()
    refiner.processor = SpyProcessor(refiner.processor)
    image = (np.random.default_rng(0).random((50, 80, 3)) * 255).astype(np.uint8)
    coarse = np.zeros((50, 80), bool)
    coarse[5:20, 10:30] = True
    coarse[30:45, 50:70] = True
    refined = refiner.refine(image, coarse)
    assert refined.shape == (50, 80) and refined.dtype == bool
    assert refiner.processor.boxes == [[[[10.0, 5.0, 30.0, 20.0], [50.0, 30.0, 70.0, 45.0]]]]
    n_components = cv2.connectedComponents(refined.astype(np.uint8))[0] - 1
    assert n_components <= 2


def test_empty_coarse_mask_gives_empty_result():
    refiner = tiny_sam()
    refined = refiner.refine(np.zeros((30, 40, 3), np.uint8), np.zeros((30, 40), bool))
    assert refined.shape == (30, 40) and not refined.any()


def test_refine_folder_pairs_by_name_and_records_failures(tmp_path):
    for d in ("images", "coarse"):
        (tmp_path / d).mkdir()
    cv2.imwrite(str(tmp_path / "images" / "b.png"), np.full((40, 40), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), np.full((40, 40), 50, np.uint8))
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:25] = 255
    cv2.imwrite(str(tmp_path / "coarse" / "a.png"), mask)
    cv2.imwrite(str(tmp_path / "coarse" / "b.png"), mask[:30])        # wrong size
    cv2.imwrite(str(tmp_path / "coarse" / "c.png"), mask)             # no image
    summary = refine_folder(tmp_path / "images", tmp_path / "coarse", tmp_path / "out", tiny_sam(),
                            progress=False)
    assert summary["n_written"] == 1 and summary["n_failed"] == 2
    assert cv2.imread(str(tmp_path / "out" / "a.png"), 0).shape == (40, 40)
    reasons = " ".join(f["reason"] for f in summary["failures"])
    assert "no image named c" in reasons and "40x30" in reasons


def test_offline_checkpoint_is_a_clear_error():
    with pytest.raises(ModelUnavailableError, match="sam-vit-base.*local cache") as info:
        SamRefiner.from_pretrained("facebook/sam-vit-base")
    # SAM's own offline options, not open_clip's local-dir: form
    assert "SamModel folder" in str(info.value) and "local-dir:" not in str(info.value)


def test_refine_reads_only_the_masks_postprocess_listed(tmp_path):
    from mwm.runlog import RunManifest

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.full((40, 40), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "images" / "b.png"), np.full((40, 40), 90, np.uint8))
    manifest = RunManifest(tmp_path / "coarse", "postprocess", {})
    manifest.add(outputs=["a.png"])
    with manifest:
        pass
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:25] = 255
    cv2.imwrite(str(tmp_path / "coarse" / "a.png"), mask)
    cv2.imwrite(str(tmp_path / "coarse" / "b.png"), mask)  # a stray: not postprocess's
    summary = refine_folder(tmp_path / "images", tmp_path / "coarse", tmp_path / "out", tiny_sam(),
                            progress=False)
    assert summary["outputs"] == ["a.png"] and not (tmp_path / "out" / "b.png").exists()
