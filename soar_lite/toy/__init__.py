"""The built-in tiny default: synthetic captioned shapes and a tiny SD3 pipeline trained on them."""

from soar_lite.toy.pretrain import ToyRecipe, ensure_tiny_base, tiny_base_folder
from soar_lite.toy.shapes import (
    COLORS,
    NOVEL_COLORS,
    PALETTE,
    POSITIONS,
    SHAPES,
    VOCAB_WORDS,
    all_captions,
    caption_attributes,
    make_shape_sample,
    novel_captions,
    shapes_dataset,
    write_shapes_folder,
)
from soar_lite.toy.tiny_sd3 import (
    MAX_SEQUENCE_LENGTH,
    TOY_SETTINGS,
    build_tiny_components,
    build_tiny_pipeline,
    load_tiny_pipeline,
    read_toy_settings,
    save_tiny_pipeline,
)

__all__ = [
    "COLORS",
    "MAX_SEQUENCE_LENGTH",
    "NOVEL_COLORS",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "TOY_SETTINGS",
    "VOCAB_WORDS",
    "ToyRecipe",
    "all_captions",
    "build_tiny_components",
    "build_tiny_pipeline",
    "caption_attributes",
    "ensure_tiny_base",
    "load_tiny_pipeline",
    "make_shape_sample",
    "novel_captions",
    "read_toy_settings",
    "save_tiny_pipeline",
    "shapes_dataset",
    "tiny_base_folder",
    "write_shapes_folder",
]
