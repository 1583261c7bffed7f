"""Torch dataset over samples: cached decode + resize, augmentation applied to image and mask alike.

Samples come from `isnet_cli.io.manifest` (re-exported here: `Sample`, `DatasetSpec`, `read_dataset`,
`split_samples`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from isnet_cli.errors import InputError
from isnet_cli.io.cache import ArrayCache, cache_key
from isnet_cli.io.contract import InputContract
from isnet_cli.io.images import load_image
from isnet_cli.io.manifest import DatasetSpec, Sample, read_dataset, split_samples
from isnet_cli.io.masks import load_mask
from isnet_cli.io.preprocess import resize_pair, to_input

__all__ = ["DatasetSpec", "Sample", "XrayDataset", "augment_pair", "read_dataset", "split_samples"]


def augment_pair(
    x: torch.Tensor,
    mask: torch.Tensor,
    low: float = 0.0,
    high: float = 1.0,
    rotate_deg: float = 5.0,
    shift: float = 0.04,
    zoom: float = 0.05,
    brightness: float = 0.05,
    contrast: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same small random affine on image (bilinear) and mask (nearest); then brightness/contrast.

    Never flips (X-rays have a side). Pixels moved in from outside are air (low).
    x' = low + clamp((x - low) * c + b (high - low)), c ~ U(1 +- contrast), b ~ U(+- brightness).
    """
    r = lambda a: (torch.rand(()) * 2 - 1) * a  # noqa: E731
    angle = math.radians(float(r(rotate_deg)))
    scale = 1.0 + float(r(zoom))
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, float(r(2 * shift))], [sin, cos, float(r(2 * shift))]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    x = F.grid_sample((x - low)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    mask = F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    c = 1.0 + float(r(contrast))
    b = float(r(brightness)) * (high - low)
    x = (x * c + b).clamp(0.0, high - low) + low
    return x, mask


class XrayDataset(Dataset):
    """Samples -> (x FloatTensor(C,S,S), mask FloatTensor(1,S,S), label LongTensor()).

    Decoded + resized arrays are cached in `cache_dir` (see `isnet_cli.io.cache`), so epochs after the
    first decode nothing; `decode_count` counts decodes done by this process. Without a mask (and
    `require_masks=False`) the mask is all ones (no known background). Unlabelled samples get label -1.
    `mask_segment`: the label of the segment to use where a mask is a DICOM SEG (default: its lung segments).
    `air_background` (`--variant masked`): x outside the (augmented) mask is replaced by that value.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        contract: InputContract,
        cache_dir: str | Path | None = None,
        augment: bool = False,
        require_masks: bool = True,
        mask_segment: str | None = None,
        air_background: float | None = None,
    ) -> None:
        self.samples = list(samples)
        self.air_background = air_background
        self.classes = list(classes)
        self.contract = contract
        self.cache = None if cache_dir is None else ArrayCache(cache_dir)
        self.augment = augment
        self.require_masks = require_masks
        self.mask_segment = mask_segment
        self.decode_count = 0
        self._index = {c: i for i, c in enumerate(self.classes)}
        unknown = {s.label for s in self.samples if s.label is not None and s.label not in self._index}
        if unknown:
            raise InputError(None, f"labels {sorted(unknown)} are not among the classes {self.classes}")

    def __len__(self) -> int:
        return len(self.samples)

    def cache_settings(self) -> dict[str, Any]:
        """What the cached arrays depend on (channels and value range are applied after the cache)."""
        c = self.contract
        settings = {"v": 1, "size": c.size, "resize": c.resize, "window": c.window, "percentiles": list(c.percentiles)}
        if self.mask_segment is not None:  # another SEG segment is another mask (keys without it are unchanged)
            settings["mask_segment"] = self.mask_segment
        if c.channels == 3:  # colour files decode differently (RGB kept); grey keys stay as they were
            settings["colour"] = True
        return settings

    def load_arrays(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """(S, S) (or colour (S, S, 3)) float32 image in [0, 1] and (S, S) bool mask (or None), cached or decoded."""
        if sample.mask is None and self.require_masks:
            raise InputError(
                sample.image,
                "no mask for this image",
                f"training needs a {self.contract.roi_name} mask for every image",
            )
        key = None
        if self.cache is not None:
            key = cache_key(sample.image, sample.mask, self.cache_settings())
            hit = self.cache.get(key)
            if hit is not None:
                return hit["image"], hit.get("mask")
        c = self.contract
        decoded = load_image(sample.image, window=c.window, percentiles=c.percentiles, channels=c.channels)
        mask = None
        if sample.mask is not None:
            mask = load_mask(
                sample.mask,
                decoded.image.shape[:2],
                self.require_masks,
                image=sample.image,
                segment=self.mask_segment,
            )
        self.decode_count += 1
        image, rmask, _ = resize_pair(decoded.image, mask, c.size, c.resize)
        if key is not None and self.cache is not None:
            arrays = {"image": image} if rmask is None else {"image": image, "mask": rmask}
            self.cache.put(key, **arrays)
        return image, rmask

    def prefetch(self, progress: bool = False) -> list[InputError]:
        """Decode (or find in the cache) every sample once in this process; return every bad file's error.

        Call before training with DataLoader workers: bad files are reported all at once, here, rather than
        as a worker crash, and the workers then only read the cache.
        """
        from isnet_cli.console import track

        errors = []
        for sample in track(self.samples, "decoding", enabled=progress):
            try:
                self.load_arrays(sample)
            except InputError as exc:
                errors.append(exc)
        return errors

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.samples[i]
        image, mask = self.load_arrays(sample)
        c = self.contract
        x = torch.from_numpy(to_input(image, c))
        # Masks are built in numpy: torch's parallel fill of a fresh tensor costs milliseconds on a busy CPU.
        m = torch.from_numpy(
            np.ones((1, c.size, c.size), np.float32) if mask is None else mask[None].astype(np.float32)
        )
        if self.augment:
            x, m = augment_pair(x, m, c.low, c.high)
        if self.air_background is not None:
            x = x * m + self.air_background * (1.0 - m)
        label = -1 if sample.label is None else self._index[sample.label]
        return x, m, torch.tensor(label, dtype=torch.long)
