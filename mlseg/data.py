"""Training data: decode once, cache on the training device, sample augmented patches.

:func:`prepare_data` reads the ``train`` split of a dataset (contract of :mod:`mlseg.dataset`),
holds back a seeded validation part, and for every image: decodes it, brings it to the target
pixel size (``preprocess.target_pixel_size_um``, with the manifest's, the TIFF metadata's or
the profile's pixel size; unset, the median of the training images' sizes when they differ:
:func:`training_pixel_size`), normalises it with :func:`mlseg.preprocess.normalize` and derives
its class map with :func:`mlseg.targets.make_target`. Training images are packed into one
buffer on the device (:class:`PatchStore`), a few images at a time (one per worker thread),
each normalised image written into the buffer and its decoded image and labels freed as it
goes: the peak is the packed 13 bytes a pixel, 7 for the images still to come and the work of
the images in flight (normalising every image before packing any held 40-49). Each batch is
then cut, augmented and photometrically jittered there in a few tensor operations
(:mod:`mlseg.augment`), which keeps a GPU busy without worker processes; on CUDA the next batch
is prepared on a side stream while the current one trains (:class:`Batches`). Every random
choice is drawn from one seeded CPU generator, whose state the checkpoint keeps. A share of
patches (``train.fg_oversample``) is centred on a random nucleus pixel, as nnU-Net oversamples
foreground, and another share (``train.faint_oversample``) on one of the training set's
faintest nuclei: those whose brightness differs least from the ring of background around them
(:func:`nucleus_contrast`), the pale, vesicular nuclei a model learns last and misses first on
another lab's slides.
Validation images are cut once into fixed tiles (:class:`ValTiles`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import expand_labels

from mlseg.augment import (
    draw_params,
    gather_bilinear,
    gather_nearest,
    photometric,
    source_coords,
    to_device,
)
from mlseg.config import AugmentConfig, Config, PreprocessConfig, Profile, effective_preprocess
from mlseg.dataset import Pair, dataset_fingerprint, list_pairs, mask_kind, mask_to_labels
from mlseg.errors import ConfigError, DatasetError, size_mismatch, some_of
from mlseg.inventory import bounded_map, turn_free_hash
from mlseg.io import available_memory, image_size, read_image_for, read_mask
from mlseg.pixel_size import training_scale
from mlseg.preprocess import NO_ESTIMATE, normalize, own_stains, rescale_image, rescale_labels
from mlseg.scale import dataset_diameter_px
from mlseg.targets import make_target

_MAX_FG_PER_IMAGE = 20_000  # foreground positions kept per image for centring patches
#: Memory a pixel of the ``train`` split (its held-back validation images too, at the size
#: they are resampled to) takes at the peak of ``mlseg train``, beyond its imports and model,
#: in bytes (:func:`warn_if_split_short_of_memory`): the split is held decoded, then packed
#: as float32 (:class:`PatchStore`, :class:`ValTiles`). Peak RSS of ``mlseg train`` on the
#: 2-core dev CPU (``--device cpu``, one step, batch 2, four RGB images with 16-bit masks,
#: one held back) over the 1.7 GB of four 256 x 256 px images: 17.5 bytes a pixel of the
#: split at 4 x 3000 x 3000 px, 13.8 at 4 x 4500 x 4500, 16.7 at 4 x 6000 x 6000 (4.1 GB).
TRAIN_BYTES_PER_PIXEL = 18  # above every measured figure: a warning too low comes too late


# ----------------------------------------------------------------------------- decoding
def training_pixel_size(
    pairs: list[Pair], pp: PreprocessConfig, profile: Profile
) -> tuple[float | None, bool]:
    """``(microns per pixel the model trains at, whether images are resampled to it)``.

    ``preprocess.target_pixel_size_um`` when set. Otherwise, as nnU-Net chooses its target
    spacing, the median of the training images' known pixel sizes, but only when they span
    more than :data:`mlseg.pixel_size.SAME_SCALE_RATIO` (a mix of 20x and 40x tiles): a
    model trained on two scales at once learns neither. Within that ratio the images keep
    their own grid and the median is recorded (:func:`mlseg.pixel_size.training_scale`). ``None`` when no size is known, the target's too: no image could be
    resampled to it, so the model's scale is unknown (a warning says so). Images without a
    pixel size (and no profile size, or declaring pixels not square: :meth:`Pair.size_or`)
    cannot be resampled; a warning names how many when others are.
    """
    sizes = [p.size_or(profile.pixel_size_um) for p in pairs]
    known = np.array([s for s in sizes if s is not None], np.float64)
    target = pp.target_pixel_size_um
    if known.size == 0:
        if target is not None:
            warnings.warn(
                f"preprocess.target_pixel_size_um is {target:g} um but none of the "
                f"{len(pairs)} training images has a pixel size, so none is resampled to it "
                "and the model's pixel size is recorded as unknown (images it segments are "
                "then scaled by their nuclei); give each image its pixel size (manifest.csv, "
                "a JSON sidecar, TIFF metadata or the profile's pixel_size_um)",
                stacklevel=3,
            )
        return None, False
    um, resampled = training_scale(sizes, target)
    if not resampled:
        return um, False
    unknown = [p.image.name for p, s in zip(pairs, sizes, strict=True) if s is None]
    if unknown:
        to = f"{target:g} um" if target is not None else f"the median, {um:g} um"
        advice = "" if target is not None else " or set preprocess.target_pixel_size_um"
        warnings.warn(
            f"{len(unknown)} of {len(pairs)} training images have no pixel size "
            f"({some_of(unknown)}) while the others "
            f"range from {known.min():g} to {known.max():g} um; they stay at their own scale "
            f"and the rest are resampled to {to}. Give every image a "
            f"pixel size (manifest.csv){advice}.",
            stacklevel=3,
        )
    return um, True


def warn_if_split_short_of_memory(
    pairs: list[Pair], pp: PreprocessConfig, profile: Profile, where: Path
) -> None:
    """Warn where training on ``pairs`` (the ``train`` split in ``where``) would need more
    memory than this process has left (:func:`mlseg.io.available_memory`), as
    :func:`mlseg.io.warn_if_short_of_memory` warns of one field: each image's size is read
    from its header and scaled as it is resampled (to ``pp.target_pixel_size_um``), and the
    split's total counts, all of it held at once. A split of fields each far under the
    per-image warning was killed by the system part-way through decoding, after minutes,
    naming neither the cause nor the fix."""
    left = available_memory()
    if left is None:
        return
    target, pixels = pp.target_pixel_size_um, 0.0
    for pair in pairs:
        size = image_size(pair.image)
        if size is None:  # decoding it names the problem
            continue
        um = pair.size_or(profile.pixel_size_um)
        scale = um / target if target is not None and um is not None else 1.0
        pixels += size[0] * size[1] * scale * scale
    need = pixels * TRAIN_BYTES_PER_PIXEL
    if need <= left:
        return
    warnings.warn(
        f"{where}: the {len(pairs)} training images, {round(pixels):,} px in all, need "
        f"about {need / 2**30:.1f} GiB of memory in mlseg train, which holds them all at once, "
        f"more than the {left / 2**30:.1f} GiB this process has left, so the system may stop "
        f"it part-way: train on fewer images or crops of them, or run on a machine with more "
        f"memory",
        stacklevel=3,
    )


def _decode(pair: Pair, target_um: float | None, default_um: float | None, stain: str):
    image = read_image_for(pair.image, stain)  # as segment and evaluate read it
    if pair.mask is None:
        raise DatasetError(f"{pair.image}: no mask; training needs one mask per image")
    mask = read_mask(pair.mask)
    if mask.shape != image.shape[:2]:
        raise DatasetError(size_mismatch(pair.mask, mask.shape, image.shape, pair.image))
    # as read: resampling a flipped or turned copy need not give the flipped resample
    key = turn_free_hash(image)
    um = pair.size_or(default_um)
    if target_um is not None and um is not None:
        image = rescale_image(image, um, target_um)
        mask = rescale_labels(mask, um, target_um)
    return image, mask, key


def _decode_all(
    pairs: list[Pair], pp: PreprocessConfig, profile: Profile, workers: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """:func:`decode_pairs`, and each image's :func:`mlseg.inventory.turn_free_hash` as read."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        out = list(
            pool.map(
                lambda p: _decode(p, pp.target_pixel_size_um, profile.pixel_size_um, profile.stain),
                pairs,
            )
        )
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def decode_pairs(
    pairs: list[Pair], pp: PreprocessConfig, profile: Profile, workers: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Decode every pair and rescale it to ``pp.target_pixel_size_um`` (threads); returns
    the images as stored (a resampled 16-bit one as float32 [0, 1] of its own full scale)
    and the masks."""
    images, masks, _ = _decode_all(pairs, pp, profile, workers)
    return images, masks


def dataset_mask_kind(configured: str, masks: list[np.ndarray]) -> str:
    """``binary`` or ``instance`` for a whole dataset: instance if any mask holds two or
    more distinct labels (a mask of one nucleus cannot tell), unless configured."""
    if configured != "auto":
        return configured
    return "instance" if any(mask_kind(m) == "instance" for m in masks) else "binary"


def check_masks(pairs: list[Pair], masks: list[np.ndarray], kind: str, where: Path) -> None:
    """Refuse training masks no model can learn from, as ``mlseg validate`` would: none
    marks a nucleus (a model of empty masks finds nothing), or, read as instance labels, a
    binary export among them (0/255 or 0/65535: one nucleus of all its nuclei)."""
    from mlseg.inventory import BINARY_EXPORT_VALUES

    if not any(m.any() for m in masks):
        raise DatasetError(
            f"{where}: none of the {len(masks)} training masks marks a nucleus (all are 0); "
            "training needs annotated nuclei: check that the masks were exported with their "
            "labels (mlseg validate lists each empty mask under mask_not_empty)"
        )
    if kind != "instance":
        return
    exports = [
        p.mask.name
        for p, m in zip(pairs, masks, strict=True)
        if int(m.max()) in BINARY_EXPORT_VALUES and not ((m != 0) & (m != m.max())).any()
    ]
    if exports:
        raise DatasetError(
            f"{where}: {len(exports)} mask(s) hold only 0 and {BINARY_EXPORT_VALUES[0]} (or "
            f"{BINARY_EXPORT_VALUES[1]}), a binary export, among instance-labelled masks "
            f"({some_of(exports)}); read as "
            "labels each would be one nucleus of all its nuclei: export them as instance "
            "labels, or set data.mask_kind: binary to train every mask as binary"
        )


def resolve_target(requested: str, kind: str, where: Path) -> str:
    """``auto`` -> ``three_class`` for instance masks, ``binary`` for binary masks.

    Asking for ``three_class`` on binary masks is a :class:`ConfigError`: touching nuclei
    cannot be told apart in them.
    """
    if requested == "auto":
        return "three_class" if kind == "instance" else "binary"
    if requested == "three_class" and kind == "binary":
        raise ConfigError(
            f"train.target: three_class needs instance-labelled masks, but the masks in {where} "
            "are binary; set train.target: binary (or provide instance masks)"
        )
    return requested


# ----------------------------------------------------------------------------- faint nuclei
def nucleus_contrast(image: np.ndarray, labels: np.ndarray, ring_px: int = 3) -> np.ndarray:
    """Per nucleus (labels ``1..max``), the absolute difference between its mean brightness
    (mean over channels) and that of a ring of background ``ring_px`` wide around it; NaN
    for labels that are absent or have no background ring. Stain-agnostic: dark nuclei on
    bright H&E and bright nuclei on dark fluorescence both score high, pale ones low."""
    n = int(labels.max())
    if n == 0:
        return np.zeros(0)
    # summed in float64 as it is read: a float64 copy of the image took 24 bytes a pixel
    gray = image.reshape(*labels.shape, -1).mean(axis=2, dtype=np.float64)
    ring = np.where(labels == 0, expand_labels(labels, ring_px), 0)
    index = np.arange(1, n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = np.asarray(ndimage.mean(gray, labels, index))
        around = np.asarray(ndimage.mean(gray, ring, index))
    return np.abs(inside - around)


def faint_candidates(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per nucleus of one image, its :func:`nucleus_contrast` and the flat position of its
    centroid, both ``(n,)``: what :func:`faintest` chooses from."""
    from skimage.segmentation import relabel_sequential

    # ids 1..n: a tile of a slide's label image keeps ids up to 2**31 - 1, and the contrast
    # table runs to the largest (22 s and 2.9 GB for 100 nuclei with ids near 5e7)
    labels = relabel_sequential(labels)[0]
    contrast = nucleus_contrast(image, labels)
    if not len(contrast):
        return contrast, np.zeros(0, np.int64)
    ids = np.arange(1, len(contrast) + 1)
    cy, cx = np.asarray(ndimage.center_of_mass(np.ones(labels.shape), labels, ids)).T
    width = labels.shape[1]
    return contrast, np.round(cy).astype(np.int64) * width + np.round(cx).astype(np.int64)


def faintest(candidates: list[tuple[np.ndarray, np.ndarray]], quantile: float) -> list[np.ndarray]:
    """Per image, the flat positions of the centroids of its faint nuclei: those whose
    contrast is at or below the ``quantile`` of all nuclei of ``candidates``
    (:func:`faint_candidates` of each image)."""
    every = np.concatenate([c for c, _ in candidates]) if candidates else np.zeros(0)
    every = every[np.isfinite(every)]
    if not len(every):
        return [np.zeros(0, np.int64) for _ in candidates]
    limit = np.quantile(every, quantile)
    return [pos[np.isfinite(c) & (c <= limit)] for c, pos in candidates]


def faint_nuclei(
    images: list[np.ndarray], labels: list[np.ndarray], quantile: float
) -> list[np.ndarray]:
    """Per image, the flat positions of the centroids of its faint nuclei: those whose
    :func:`nucleus_contrast` is at or below the ``quantile`` of all nuclei of ``images``."""
    pairs = zip(images, labels, strict=True)
    return faintest([faint_candidates(x, lab) for x, lab in pairs], quantile)


# ----------------------------------------------------------------------------- patch store
class PatchStore:
    """Images packed in one device buffer; samples augmented ``(B, C, P, P)`` batches.

    ``pixels`` ``(M, C)`` float16 (float32 on CPU), ``classes`` ``(M,)`` uint8 class maps,
    per image ``offset``/``height``/``width``; ``fg`` flat positions of foreground pixels.
    """

    def __init__(
        self,
        images: list[np.ndarray],
        targets: list[np.ndarray],
        device: torch.device,
        seed: int = 0,
        faint: list[np.ndarray] | None = None,
    ) -> None:
        self._pack([im.shape[:2] for im in images], zip(images, targets, strict=True), device, seed)
        self.set_faint(faint)

    @classmethod
    def packed(
        cls,
        shapes: list[tuple[int, int]],
        prepared: Iterable[tuple[np.ndarray, np.ndarray]],
        device: torch.device,
        seed: int = 0,
    ) -> PatchStore:
        """The store of images of ``shapes`` ``(H, W)`` that ``prepared`` yields one by one,
        each as ``((H, W, C) image, (H, W) classes)``: each is copied into the buffer as it
        comes, so only one is held beside it. Faint nuclei are set with :meth:`set_faint`."""
        store = cls.__new__(cls)
        store._pack(shapes, prepared, device, seed)
        store.set_faint(None)
        return store

    def _pack(
        self,
        shapes: list[tuple[int, int]],
        prepared: Iterable[tuple[np.ndarray, np.ndarray]],
        device: torch.device,
        seed: int,
    ) -> None:
        if not shapes:
            raise DatasetError("no training images left after holding back validation images")
        self.device = device
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        heights = [h for h, _ in shapes]
        widths = [w for _, w in shapes]
        sizes = [h * w for h, w in shapes]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        # written in place: images gathered in a list and concatenated were held twice
        pixels, classes = None, np.empty(sum(sizes), np.uint8)
        rng = np.random.default_rng(seed)
        fg, counts = [], []
        for (image, t), start, size in zip(prepared, offsets, sizes, strict=True):
            if image.shape[:2] != t.shape or t.size != size:
                raise ValueError(f"image {image.shape} and classes {t.shape} of another size")
            if pixels is None:
                self.channels = image.shape[2]
                pixels = np.empty((sum(sizes), self.channels), image.dtype)
            pixels[start : start + size] = image.reshape(-1, self.channels)
            classes[start : start + size] = t.reshape(-1)
            pos = np.flatnonzero(t.reshape(-1) > 0)
            if len(pos) > _MAX_FG_PER_IMAGE:
                pos = np.sort(rng.choice(pos, _MAX_FG_PER_IMAGE, replace=False))
            fg.append(pos)
            counts.append(len(pos))
            del image, t, pos  # before the next image is prepared
        self.pixels = torch.from_numpy(pixels).to(device=device, dtype=dtype)
        self.classes = torch.from_numpy(classes).to(device)
        self.offset = torch.tensor(offsets, device=device)
        self.height = torch.tensor(heights, device=device)
        self.width = torch.tensor(widths, device=device)
        # per-image facts and foreground positions (image-local flat index) on the CPU,
        # where patch centres are drawn
        self.height_cpu = torch.tensor(heights)
        self.width_cpu = torch.tensor(widths)
        self.fg = torch.from_numpy(np.concatenate(fg).astype(np.int64))
        self.fg_count = torch.tensor(counts)
        self.fg_start = torch.tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
        # every pixel equally likely: images weighted by area
        self.weights = torch.tensor(sizes, dtype=torch.float64)
        self.n_images = len(shapes)

    def set_faint(self, faint: list[np.ndarray] | None) -> None:
        """Per image, the flat positions of its faint nuclei (:func:`faint_nuclei`)."""
        # (image, image-local flat index of the centroid), all images together
        faint = faint or [np.zeros(0, np.int64)] * self.n_images
        self.faint_img = torch.from_numpy(
            np.concatenate([np.full(len(f), i, np.int64) for i, f in enumerate(faint)])
        )
        self.faint_pos = torch.from_numpy(np.concatenate(faint).astype(np.int64))

    def centres(
        self,
        batch: int,
        patch: int,
        fg_fraction: float,
        gen: torch.Generator,
        faint_fraction: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image index ``(B,)`` and patch centre ``(B, 2)`` (x, y), drawn on the CPU from
        ``gen``: with probability ``faint_fraction`` on a random faint nucleus, with
        probability ``fg_fraction`` on a random foreground pixel, else uniform over the image
        (patch inside it where it fits). When the store holds no faint nucleus, the faint
        share goes to foreground pixels (a patch on a nucleus rather than on background).
        Returned on the store's device."""
        img = torch.multinomial(self.weights, batch, replacement=True, generator=gen)
        u = torch.rand((batch, 2), generator=gen)
        pick = torch.rand(batch, generator=gen)
        r = torch.rand(batch, generator=gen)
        use_faint = torch.zeros(batch, dtype=torch.bool)
        if faint_fraction > 0 and len(self.faint_pos):
            use_faint = r < faint_fraction
            k = (torch.rand(batch, generator=gen) * len(self.faint_pos)).long()
            img = torch.where(use_faint, self.faint_img[k], img)
        h, w = self.height_cpu[img], self.width_cpu[img]
        half = (patch - 1) / 2
        left = torch.where(
            w >= patch, (u[:, 0] * ((w - patch).clamp(min=0) + 1)).floor(), (w - patch) // 2
        )
        top = torch.where(
            h >= patch, (u[:, 1] * ((h - patch).clamp(min=0) + 1)).floor(), (h - patch) // 2
        )
        count = self.fg_count[img]
        pick = (pick * count.clamp(min=1)).long()
        use_fg = ~use_faint & (r < faint_fraction + fg_fraction) & (count > 0)

        def centred_on(chosen: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # where chosen, the patch corner that puts flat pixel position ``flat`` central
            return (
                torch.where(chosen, flat % w - patch // 2, left),
                torch.where(chosen, flat // w - patch // 2, top),
            )

        if len(self.fg):
            left, top = centred_on(
                use_fg, self.fg[(self.fg_start[img] + pick).clamp(max=len(self.fg) - 1)]
            )
        if use_faint.any():
            left, top = centred_on(use_faint, self.faint_pos[k])
        centre = torch.stack([left.float() + half, top.float() + half], dim=1)
        return to_device(img, self.device), to_device(centre, self.device)

    def sample(
        self,
        batch: int,
        patch: int,
        aug: AugmentConfig,
        gen: torch.Generator,
        *,
        fg_fraction: float = 0.33,
        faint_fraction: float = 0.0,
        stain_jitter: bool = True,
        channels_last: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An augmented batch: ``(B, C, P, P)`` float32 images, ``(B, P, P)`` int64 classes.

        Random draws come from ``gen`` first; the cutting and augmenting that follows is a
        pure function of them (compiled after :meth:`compile`).
        """
        img, centre = self.centres(batch, patch, fg_fraction, gen, faint_fraction)
        params = draw_params(
            batch,
            patch,
            self.channels,
            aug,
            gen,
            self.device,
            stain_jitter=stain_jitter,
            subset=self._render == self.render,
        )
        try:
            x, y = self._render(img, centre, params, aug, patch)
        except Exception as err:  # a compiler failure must not stop training: run eagerly
            if self._render == self.render:
                raise
            warnings.warn(
                f"torch.compile of patch sampling failed ({err}); running it eagerly", stacklevel=2
            )
            self._render = self.render
            x, y = self._render(img, centre, params, aug, patch)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory), y

    def render(
        self, img: torch.Tensor, centre: torch.Tensor, params, aug: AugmentConfig, patch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut and augment patches of images ``img`` ``(B,)`` at ``centre`` ``(B, 2)``."""
        sx, sy = source_coords(params, centre, patch)
        where = (
            self.offset[img, None, None],
            self.height[img, None, None],
            self.width[img, None, None],
        )
        x = gather_bilinear(self.pixels, *where, sx, sy).permute(0, 3, 1, 2)  # channels_last layout
        y = gather_nearest(self.classes, *where, sx, sy).long()
        return photometric(x, params, aug, y), y

    _render = render

    def compile(self) -> None:
        """Fuse :meth:`render` with ``torch.compile`` (fewer passes over each batch on a GPU)."""
        self._render = torch.compile(self.render, dynamic=False)


class Batches:
    """Endless training batches from ``make()``, drawn with the CPU generator ``gen``.

    On CUDA the next batch is cut and augmented on a side stream while the current one
    trains, so sampling overlaps the model's work. :meth:`generator_state` is the state of
    ``gen`` that reproduces the next batch handed out (what a checkpoint must save).
    """

    def __init__(self, make, gen: torch.Generator, device: torch.device) -> None:
        self.make, self.gen, self.device = make, gen, device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending = None
        self.pending_state = gen.get_state()
        if self.side is not None:
            # The side stream reads the images uploaded on the current stream and nothing
            # written after. Those copies block today; the wait keeps this ordered if the
            # upload is ever made asynchronous (pinned memory, non_blocking=True).
            self.side.wait_stream(torch.cuda.current_stream(device))
            self._prefetch()

    def _prefetch(self) -> None:
        self.pending_state = self.gen.get_state()
        with torch.cuda.stream(self.side):
            self.pending = self.make()

    def generator_state(self) -> torch.Tensor:
        return self.pending_state if self.side is not None else self.gen.get_state()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.side is None:
            return self.make()
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.side)
        x, y = self.pending
        x.record_stream(main)  # memory of x, y is not reused before main is done with it
        y.record_stream(main)
        self._prefetch()
        return x, y


# ----------------------------------------------------------------------------- validation
@dataclass
class ValTiles:
    """Validation images cut into ``P x P`` tiles (reflect-padded), on the device."""

    images: torch.Tensor  # (T, C, P, P) float16/float32
    classes: torch.Tensor  # (T, P, P) uint8: int64 took 8 bytes a pixel, 302 MB for 6000 x 6000
    valid: torch.Tensor  # (T, P, P) bool, False on padding
    n_images: int

    @classmethod
    def from_arrays(
        cls, images: list[np.ndarray], targets: list[np.ndarray], patch: int, device: torch.device
    ) -> ValTiles:
        return cls.cut([t.shape for t in targets], zip(images, targets, strict=True), patch, device)

    @classmethod
    def cut(
        cls,
        shapes: list[tuple[int, int]],
        prepared: Iterable[tuple[np.ndarray, np.ndarray]],
        patch: int,
        device: torch.device,
    ) -> ValTiles:
        """The tiles of the images of ``shapes`` ``(H, W)`` that ``prepared`` yields one by
        one, each as ``((H, W, C) image, (H, W) classes)``: only one is held while cut."""
        # filled in place: a list of tiles stacked at the end held them twice (300 held-back
        # 64 x 64 tiles padded to 256: 236 MB more)
        grid = [(-(-h // patch), -(-w // patch)) for h, w in shapes]
        n = sum(rows * cols for rows, cols in grid)
        xs = None
        ys = np.empty((n, patch, patch), np.uint8)
        vs = np.zeros((n, patch, patch), bool)
        k = 0
        for (im, t), (rows, cols) in zip(prepared, grid, strict=True):
            if xs is None:
                xs = np.empty((n, im.shape[2], patch, patch), np.float32)
            _cut_tiles(im, t, patch, xs[k : k + rows * cols], ys[k:], vs[k:])
            k += rows * cols
            del im, t  # before the next image is prepared
        if xs is None:
            xs = np.empty((0, 1, patch, patch), np.float32)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        return cls(
            images=torch.from_numpy(xs).to(device=device, dtype=dtype),
            classes=torch.from_numpy(ys).to(device),
            valid=torch.from_numpy(vs).to(device),
            n_images=len(shapes),
        )


def _cut_tiles(
    im: np.ndarray, t: np.ndarray, patch: int, xs: np.ndarray, ys: np.ndarray, vs: np.ndarray
) -> None:
    """Write the reflect-padded ``patch`` tiles of one image, row by row, to the first of
    ``xs`` ``(T, C, P, P)``, ``ys`` and ``vs`` ``(T, P, P)``."""
    h, w = t.shape
    rows, cols = -(-h // patch), -(-w // patch)
    ph, pw = rows * patch - h, cols * patch - w
    channels = im.shape[2]
    mode = "reflect" if min(h, w) > 1 else "edge"
    im_p = np.pad(im, ((0, ph), (0, pw), (0, 0)), mode=mode)
    t_p = np.pad(t, ((0, ph), (0, pw)), mode=mode)
    valid = np.zeros(t_p.shape, bool)
    valid[:h, :w] = True
    m = rows * cols
    xs[:m].reshape(rows, cols, channels, patch, patch)[:] = im_p.reshape(
        rows, patch, cols, patch, channels
    ).transpose(0, 2, 4, 1, 3)
    for out, a in ((ys, t_p), (vs, valid)):
        out[:m].reshape(rows, cols, patch, patch)[:] = a.reshape(
            rows, patch, cols, patch
        ).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- all of it
@dataclass
class TrainData:
    """Everything :func:`mlseg.train.fit` needs from a dataset."""

    train: PatchStore
    val: ValTiles | None
    target: str  # "binary" | "three_class"
    in_channels: int
    pixel_size_um: float | None  # of the images as the model sees them; None if unknown
    nucleus_diameter_px: float | None  # typical nucleus diameter of the masks at that scale
    preprocess: PreprocessConfig  # the normalisation applied
    stain: str
    fingerprint: str
    train_stems: list[str]
    val_stems: list[str]
    # microns per pixel of each training image as read (manifest, metadata, else the
    # profile's): the fingerprint hashes the sizes the images declare, not the profile's
    image_pixel_sizes: dict[str, float | None] = field(default_factory=dict)
    # each image's turn_free_hash as read, by role: evaluate tells a trained-on image by
    # its pixels, whatever its name or format in the set it scores
    image_hashes: dict[str, list[str]] = field(default_factory=dict)


#: What a training image stain normalisation leaves as it is means, by the reason
#: :func:`mlseg.preprocess.macenko_estimate` made no estimate.
UNSTAINED_MEANING = {
    "few": "right for tiles of blank glass, but a faded or very pale slide teaches the model "
    "an appearance no normalised image has: leave such slides out",
    "one_colour": "a haematoxylin-only or other single-stain slide: train on such slides with "
    "preprocess.stain_norm none",
    "no_haematoxylin": "red cells or an eosin-only field, with few nuclei to learn",
}


def warn_unstained(
    stems: dict[str, list[str]], total: int, pp: PreprocessConfig, where: Path
) -> None:
    """Name the training images that stain normalisation leaves as they are, by why
    (``stems``: a :data:`mlseg.preprocess.NO_ESTIMATE` key -> their stems), as ``mlseg
    segment`` names such an image it segments: the model learns them un-normalised, unlike
    every other image it sees."""
    why = "; ".join(
        f"{some_of(names)} ({NO_ESTIMATE[reason]}): {UNSTAINED_MEANING[reason]}"
        for reason, names in stems.items()
    )
    warnings.warn(
        f"{where}: {sum(map(len, stems.values()))} of {total} training images are learnt "
        "un-normalised, "
        f"{pp.stain_norm.capitalize()} normalisation finding no two stains in them; {why}",
        stacklevel=3,
    )


def split_validation(
    n: int, fraction: float, seed: int, groups: Sequence[Hashable] | None = None
) -> np.ndarray:
    """Indices of the held-back validation images: ``round(n * fraction)``, at least one
    when ``fraction > 0`` and ``n >= 2``, always leaving one for training; seeded.

    ``groups`` (one key per image) holds back the images of one key together: a mirrored
    or turned copy saved beside a tile (:func:`mlseg.inventory.turn_free_hash`) is never
    trained on while the tile validates. Groups are drawn in the seed's order, each taken
    where it fits in the ``k`` images still to hold back, so with every key distinct the
    split is the one without groups; where none fits (every group larger than ``k``), the
    smallest is held back. A group of ten identical blank tiles taken whole held back 13
    images of 20 for ``k`` 4, and could leave no nucleus to validate on.
    """
    if fraction <= 0 or n < 2:
        return np.empty(0, np.int64)
    k = int(min(max(1, round(n * fraction)), n - 1))
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(range(n) if groups is None else groups):
        members.setdefault(key, []).append(i)
    grouped = list(members.values())
    if len(grouped) < 2:  # one image and its copies: none left to train on
        return np.empty(0, np.int64)
    held: list[int] = []
    order = [grouped[g] for g in np.random.default_rng(seed).permutation(len(grouped))]
    for group in order:
        if len(held) + len(group) <= k:  # at most k <= n - 1: some group is left to train
            held += group
    if not held:
        held = min(order, key=len)  # the first of the smallest, in the seed's order
    return np.sort(np.array(held, np.int64))


def prepare_data(
    cfg: Config,
    data_root: str | Path,
    profile: Profile,
    device: torch.device,
    *,
    in_channels: int | None = None,
) -> TrainData:
    """Decode, rescale, normalise and split the ``train`` split of ``data_root``.

    ``in_channels`` forces the model's input channels (else the profile's). Raises
    :class:`DatasetError` for an empty or malformed training set and :class:`ConfigError`
    when ``train.target`` does not fit the masks.
    """
    root = Path(data_root)
    pairs = list_pairs(root, "train", cfg.data, strict=True)
    if not pairs:
        base = root / cfg.data.train_dir / cfg.data.image_dir
        raise DatasetError(f"{base}: no training images; put images and masks there first")
    pp = effective_preprocess(cfg, profile)
    pixel_size, resample = training_pixel_size(pairs, pp, profile)
    if resample:
        pp = pp.model_copy(update={"target_pixel_size_um": pixel_size})
    channels = in_channels or profile.channels
    warn_if_split_short_of_memory(pairs, pp, profile, root / cfg.data.train_dir)
    images, masks, copies = _decode_all(pairs, pp, profile, cfg.train.num_workers)
    kind = dataset_mask_kind(cfg.data.mask_kind, masks)
    check_masks(pairs, masks, kind, root / cfg.data.train_dir / cfg.data.mask_dir)
    target = resolve_target(cfg.train.target, kind, root / cfg.data.train_dir)
    # in place: every mask and its int32 labels were held together
    labels, masks = masks, None
    for i in range(len(labels)):
        labels[i] = mask_to_labels(labels[i], kind)
    diameter = dataset_diameter_px(labels)
    val_idx = split_validation(len(pairs), cfg.data.val_fraction, cfg.data.seed, copies)
    if cfg.data.val_fraction > 0 and not len(val_idx):
        one = "one training image" if len(pairs) == 1 else "one training image and its copies"
        warnings.warn(
            f"{root / cfg.data.train_dir}: {one}, so none is held back for "
            f"validation (data.val_fraction {cfg.data.val_fraction:g}): best.safetensors will be "
            "the checkpoint of lowest training loss, which says nothing of other images; "
            "add annotated images to validate on",
            stacklevel=2,
        )
    if len(val_idx) and not any(labels[i].any() for i in val_idx):
        held = [pairs[i].stem for i in val_idx]
        raise DatasetError(
            f"{root / cfg.data.train_dir}: the validation images held back "
            f"({some_of(held)}) mark no nucleus, so "
            "validation Dice is 0 for any checkpoint that predicts one there and best.safetensors "
            "stays the first; draw another split (data.seed), hold back more "
            "(data.val_fraction), or annotate them"
        )
    trained = sorted(set(range(len(pairs))) - set(val_idx.tolist()))
    if not any(labels[i].any() for i in trained):  # with none held back, check_masks said so
        held = [pairs[i].stem for i in val_idx]
        raise DatasetError(
            f"{root / cfg.data.train_dir}: the training images "
            f"({some_of([pairs[i].stem for i in trained])}) mark no nucleus once the "
            f"validation images ({some_of(held)}) are held back, so the model would learn to "
            "find none; annotate them, or draw another split (data.seed) or hold back fewer "
            "(data.val_fraction)"
        )

    is_val = np.zeros(len(pairs), bool)
    is_val[val_idx] = True
    train_idx = np.flatnonzero(~is_val)
    faint = {} if cfg.train.faint_oversample > 0 else None  # image -> faint_candidates
    workers = cfg.train.num_workers or min(8, os.cpu_count() or 1)
    unstained: list[tuple[str, str]] = []  # (stem, why) stain normalisation leaves as is

    # A few images at a time (one per worker) from decoded to packed, each decoded image and
    # its labels freed as it goes: every image normalised before any was packed held 40-49
    # bytes a pixel.
    def prep(i: int) -> tuple[np.ndarray, np.ndarray]:
        stains, reason = own_stains(images[i], pp, profile.stain)
        if stains is None:
            unstained.append((pairs[i].stem, reason))
        x = normalize(images[i], pp, profile.stain, channels=channels, stains=stains)
        t = make_target(labels[i], target, cfg.train.boundary_px).astype(np.uint8)
        if faint is not None and not is_val[i]:
            faint[i] = faint_candidates(x, labels[i])
        images[i] = labels[i] = None
        return x, t

    def prepared(indices: np.ndarray):
        # in order, at most ``workers`` in flight; nothing here keeps a reference to what
        # is yielded, so an image packed is freed
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield from bounded_map(pool, prep, list(indices), workers)

    shapes = [labels[i].shape for i in train_idx]
    store = PatchStore.packed(shapes, prepared(train_idx), device, seed=cfg.data.seed)
    if faint is not None:
        store.set_faint(faintest([faint[i] for i in train_idx], cfg.train.faint_quantile))
    tiles = (
        ValTiles.cut(
            [labels[i].shape for i in val_idx], prepared(val_idx), cfg.train.patch_size, device
        )
        if len(val_idx)
        else None
    )
    if unstained:
        # by name: the images were prepared by threads, in the order they finished
        stems: dict[str, list[str]] = {}
        for stem, why in sorted(unstained):
            stems.setdefault(why, []).append(stem)
        warn_unstained(stems, len(pairs), pp, root / cfg.data.train_dir)
    return TrainData(
        train=store,
        val=tiles,
        target=target,
        in_channels=channels,
        pixel_size_um=pixel_size,
        nucleus_diameter_px=diameter,
        preprocess=pp,
        stain=profile.stain,
        fingerprint=dataset_fingerprint(pairs),
        train_stems=[p.stem for p, v in zip(pairs, is_val, strict=True) if not v],
        val_stems=[pairs[i].stem for i in val_idx],
        image_hashes={
            "train": sorted({h for h, v in zip(copies, is_val, strict=True) if not v}),
            "validation": sorted({copies[i] for i in val_idx}),
        },
        image_pixel_sizes={p.stem: p.size_or(profile.pixel_size_um) for p in pairs},
    )
