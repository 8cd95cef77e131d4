"""How colours look to colour-blind viewers, and how far apart they are (tests only).

Machado, Oliveira and Fernandes (2009), "A physiologically-based model for simulation of
color vision deficiency", severity 1.0: protanopia, deuteranopia and tritanopia as 3 x 3
matrices on linear RGB. Distances are CIEDE2000 (scikit-image), about 2.3 where a person
first sees a difference between two large patches; a one-pixel outline needs far more.
"""

from __future__ import annotations

import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab

MACHADO = {
    "protanopia": (
        (0.152286, 1.052583, -0.204868),
        (0.114503, 0.786281, 0.099216),
        (-0.003882, -0.048116, 1.051998),
    ),
    "deuteranopia": (
        (0.367322, 0.860646, -0.227968),
        (0.280085, 0.672501, 0.047413),
        (-0.011820, 0.042940, 0.968881),
    ),
    "tritanopia": (
        (1.255528, -0.076749, -0.178779),
        (-0.078411, 0.930809, 0.147602),
        (0.004733, 0.691367, 0.303900),
    ),
}
#: Normal vision first, then the three dichromacies.
VISIONS = (None, *MACHADO)


def seen_lab(rgb, vision: str | None) -> np.ndarray:
    """``(..., 3)`` 8-bit RGB -> CIELAB as a viewer with ``vision`` (None: normal) sees it."""
    srgb = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    if vision is not None:
        linear = np.clip(linear @ np.asarray(MACHADO[vision]).T, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return rgb2lab(srgb.reshape(-1, 1, 3)).reshape(srgb.shape)


def distance(a, b, vision: str | None) -> np.ndarray:
    """CIEDE2000 between 8-bit RGB colours ``a`` and ``b`` (broadcast) as ``vision`` sees them."""
    a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
    return deltaE_ciede2000(seen_lab(a, vision), seen_lab(b, vision))
