"""The cache stage: encode images and captions once, train from the cached tensors.

Training then needs neither the VAE encoder nor the text encoders (T5-XXL alone is ~9 GB): the
cache stage loads them, writes one safetensors file, and frees them before the transformer loads.
This is the basic cache (one file per dataset + settings, keyed by a hash of everything that
changes the tensors: image files, captions, resolution, model, sequence length); the data issue
makes it per-item and content-addressed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from soar_lite.data import Item, load_pixels

CACHE_VERSION = 1
ENCODE_BATCH = 16


@dataclass
class CachedData:
    """Everything training reads: latents, caption embeddings, empty-prompt and validation embeddings."""

    latents: Tensor
    cond: dict[str, Tensor]
    empty: dict[str, Tensor]
    validation: dict[str, Tensor]
    captions: list[str]
    validation_prompts: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def rows(self, batch_number: int, size: int, seed: int) -> Tensor:
        """The dataset rows of global batch ``batch_number`` (all processes together, ``size`` rows).

        Rows come from an endless stream of seeded per-epoch permutations and the position is just
        a counter, so a resumed run, or another process count on the same global batch, sees
        exactly the same rows.
        """
        n, start = len(self), batch_number * size
        rows = []
        for pos in range(start, start + size):
            epoch, offset = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            rows.append(int(perm[offset]))
        return torch.tensor(rows, dtype=torch.long)

    def latents_of(self, rows: Tensor) -> Tensor:
        """Clean latents of ``rows`` (CPU)."""
        return self.latents[rows]

    def batch(
        self, indices: Tensor, device: torch.device
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """(z0, cond, uncond) for rows ``indices``, on ``device``; uncond is the empty prompt repeated."""
        n = indices.shape[0]
        cond = {k: v[indices].to(device) for k, v in self.cond.items()}
        uncond = {k: v.expand(n, *v.shape[1:]).to(device) for k, v in self.empty.items()}
        return self.latents[indices].to(device), cond, uncond


def cache_key(
    model: str,
    items: Sequence[Item],
    resolution: int,
    max_sequence_length: int,
    validation_prompts: Sequence[str],
) -> str:
    """A hash of every input that changes the cached tensors (file size + mtime stand in for bytes)."""
    record = {
        "version": CACHE_VERSION,
        "model": str(Path(model).resolve()) if Path(model).exists() else model,
        "resolution": resolution,
        "max_sequence_length": max_sequence_length,
        "items": [
            (str(it.image.resolve()), it.image.stat().st_size, it.image.stat().st_mtime_ns, it.caption)
            for it in items
        ],
        "validation": list(validation_prompts),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _encode_all(family: object, items: Sequence[Item], resolution: int, progress: bool) -> dict[str, Tensor]:
    latents, embeds, pooled = [], [], []
    bar = tqdm(total=len(items), desc="caching", unit="img", disable=not progress)
    for start in range(0, len(items), ENCODE_BATCH):
        chunk = items[start : start + ENCODE_BATCH]
        pixels = torch.stack([load_pixels(it.image, resolution) for it in chunk])
        latents.append(family.encode_images(pixels).float().cpu())
        enc = family.encode_prompts([it.caption for it in chunk])
        embeds.append(enc["prompt_embeds"].cpu())
        pooled.append(enc["pooled_prompt_embeds"].cpu())
        bar.update(len(chunk))
    bar.close()
    return {
        "latents": torch.cat(latents),
        "prompt_embeds": torch.cat(embeds),
        "pooled_prompt_embeds": torch.cat(pooled),
    }


def build_cache(
    family: object,
    items: Sequence[Item],
    resolution: int,
    validation_prompts: Sequence[str],
    folder: Path,
    *,
    progress: bool = True,
) -> Path:
    """Encode everything into ``folder`` atomically (temp folder, then rename); reuse it if complete."""
    if (folder / "index.json").is_file():
        return folder
    tensors = _encode_all(family, items, resolution, progress)
    for name, prompts in (("empty", [""]), ("validation", list(validation_prompts) or [""])):
        enc = family.encode_prompts(prompts)
        tensors.update({f"{name}.{k}": v.cpu() for k, v in enc.items()})
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    index = {
        "captions": [it.caption for it in items],
        "images": [str(it.image) for it in items],
        "validation_prompts": list(validation_prompts),
        "resolution": resolution,
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")  # written last
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_cache(folder: Path) -> CachedData:
    """Read a complete cache folder written by :func:`build_cache`."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    t = load_file(str(folder / "tensors.safetensors"))
    pick = lambda prefix: {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(prefix + ".")}  # noqa: E731
    return CachedData(
        latents=t["latents"],
        cond={"prompt_embeds": t["prompt_embeds"], "pooled_prompt_embeds": t["pooled_prompt_embeds"]},
        empty=pick("empty"),
        validation=pick("validation"),
        captions=index["captions"],
        validation_prompts=index["validation_prompts"],
    )
