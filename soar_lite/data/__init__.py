"""Dataset stage: sources, image and caption checks, aspect-ratio buckets (no encoders here).

``load_items(cfg.data)`` turns any supported dataset into checked :class:`Item` s; the cache stage
(``soar_lite.cache``) turns those into tensors. See the README's "Data and cache" section.
"""

from soar_lite.data.buckets import bucket_for, cover_crop, make_buckets
from soar_lite.data.captions import decode_text, finish_caption, read_caption
from soar_lite.data.images import IMAGE_EXTS, BadImage, decode_rgb, load_pixels, probe
from soar_lite.data.items import (
    DataReport,
    Item,
    Skips,
    builtin_data_folder,
    list_items,
    load_items,
    read_image_bytes,
    verify_items,
)
from soar_lite.data.sources import FORMATS, detect_format

__all__ = [
    "FORMATS",
    "IMAGE_EXTS",
    "BadImage",
    "DataReport",
    "Item",
    "Skips",
    "bucket_for",
    "builtin_data_folder",
    "cover_crop",
    "decode_rgb",
    "decode_text",
    "detect_format",
    "finish_caption",
    "list_items",
    "load_items",
    "load_pixels",
    "make_buckets",
    "probe",
    "read_caption",
    "read_image_bytes",
    "verify_items",
]
