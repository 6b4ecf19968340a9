"""The cache stage: encode each image and caption once, keyed by content, and train from the tensors.

Training on a consumer GPU needs the VAE encoder and the text encoders (T5-XXL alone is ~9 GB) gone
while the transformer trains. This stage loads them only when something is missing, writes the
tensors, and frees them. Every tensor is stored under a key that hashes *everything that changes
it*, so a cache is never stale (kohya_ss#1629, OneTrainer#1134) and never recomputed needlessly:

* an image latent: sha256 of the image bytes, its bucket size, the pixel recipe (EXIF, alpha,
  resize, crop), the VAE's files and the dtype;
* a text embedding: the caption, the text encoders' and tokenizers' files, which encoders exist,
  the zero-T5 width, ``max_sequence_length`` and the dtype.

So an edited caption re-encodes that caption only, an edited image that image only, a new resolution
or text encoder re-encodes what it changes, and the same item in another run or dataset is reused
(one cache folder can be shared). The empty prompt (SOAR's CFG rollout) and the validation prompts
are text keys like any caption.

The package, one job a module (each module's docstring says what it owns and why)::

    ids.py      content keys, model fingerprints, ModelIds, local_model_folder
    store.py    the shard store (layout and crash safety), index, manifests, ShardReader, DiskRows
    encode.py   CacheSpec, image/text keys, prepare, the encode stage (ENCODE_BATCH)
    order.py    CachedData (batch order, caption dropout), load_cache (in RAM or from disk)
    prune.py    Usage, usage (--info / --prune)

Imports point one way only, ``ids <- store <- encode / order / prune``: a module never imports the
ones that use it, and none imports this file. Callers use ``from soar_lite import cache; cache.X``
with the names below. A test that patches a module-level name (``ENCODE_BATCH``, ``save_file``,
``_ram_budget``) patches it on the submodule that looks it up; those names are deliberately not
re-exported here, so that patching them on the package fails loudly instead of doing nothing.
"""

from soar_lite.cache.encode import (
    PIXEL_RECIPE,
    CacheResult,
    CacheSpec,
    EncoderLoader,
    image_key,
    prepare,
    text_key,
)
from soar_lite.cache.ids import (
    CACHE_VERSION,
    HUB_PATTERNS,
    Fingerprints,
    ModelIds,
    local_model_folder,
    model_ids,
)
from soar_lite.cache.order import CachedData, load_cache
from soar_lite.cache.prune import Usage, _referenced_keys, usage
from soar_lite.cache.store import STORE_NAME, TEXT_FIELDS, DiskRows, ShardReader, Store, cache_root

__all__ = [
    "CACHE_VERSION",
    "HUB_PATTERNS",
    "PIXEL_RECIPE",
    "STORE_NAME",
    "TEXT_FIELDS",
    "CacheResult",
    "CacheSpec",
    "CachedData",
    "DiskRows",
    "EncoderLoader",
    "Fingerprints",
    "ModelIds",
    "ShardReader",
    "Store",
    "Usage",
    "_referenced_keys",
    "cache_root",
    "image_key",
    "load_cache",
    "local_model_folder",
    "model_ids",
    "prepare",
    "text_key",
    "usage",
]
