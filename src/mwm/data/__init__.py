"""Data: image/mask readers, dataset layouts, prompt mappings and phantom datasets."""

from .io import (DataError, Image2D, SliceRef, iter_images, list_slices, load_model_input,
                 read_image, read_mask, to_model_input)
from .layouts import (Sample, attach_prompts, class_folders, find_images, load_prompts,
                      paired_folders, prompt_for, read_manifest)

__all__ = [
    "DataError", "Image2D", "SliceRef", "iter_images", "list_slices", "load_model_input",
    "read_image", "read_mask", "to_model_input", "Sample", "attach_prompts", "class_folders",
    "find_images", "load_prompts", "paired_folders", "prompt_for", "read_manifest",
]
