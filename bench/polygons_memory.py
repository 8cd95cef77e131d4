"""Peak memory of the per-image outlines (``mlseg.outputs.polygons``, under the GeoJSON of
every image ``mlseg segment`` and ``mlseg quantify`` write) against the function as it was
before the memory fix of the audit session (int64 compact label ids of the whole image, the
padded labels and the edge finding's whole-image temporaries kept until the rings were
traced), on the same label image.

The label image is the ground-truth masks of ``../shared/data`` (``--set``, default
``cpm15_he``) tiled side by side to ``--side`` x ``--side`` pixels, each tile's nuclei given
their own ids, so it has the nucleus density of real tissue. Peaks are numpy allocations
traced by ``tracemalloc`` beyond the label image, the same figure on any machine for the
same input. The rings of both are checked equal. Prints the peaks in MB and bytes per pixel
and the ratio before / ours, then one JSON line.

    python bench/polygons_memory.py [--side 4000] [--set cpm15_he]
"""

from __future__ import annotations

import argparse
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def field(name: str, side: int) -> np.ndarray:
    """``(side, side) int32``: the masks of set ``name`` tiled row by row, ids kept apart."""
    from mlseg.io import read_mask

    masks = [read_mask(p).astype(np.int32) for p in sorted((DATA / name / "masks").glob("*"))]
    labels = np.zeros((side, side), np.int32)
    y, x, row_h, offset, i = 0, 0, 0, 0, 0
    while y < side:
        mask = masks[i % len(masks)]
        i += 1
        h, w = min(mask.shape[0], side - y), min(mask.shape[1], side - x)
        tile = mask[:h, :w]
        labels[y : y + h, x : x + w] = np.where(tile > 0, tile + offset, 0)
        offset += int(mask.max())
        row_h = max(row_h, h)
        x += w
        if x >= side:
            x, y, row_h = 0, y + row_h, 0
    return labels


def peak_of(fn, labels: np.ndarray):
    """``(result, peak bytes traced during fn(labels))``."""
    tracemalloc.start()
    try:
        result = fn(labels)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def same_rings(a: dict, b: dict) -> bool:
    """Same labels, the same polygons, the same rings vertex for vertex."""
    if a.keys() != b.keys():
        return False
    for label, polys in a.items():
        if len(polys) != len(b[label]):
            return False
        for pa, pb in zip(polys, b[label], strict=True):
            if len(pa) != len(pb) or not all(map(np.array_equal, pa, pb)):
                return False
    return True


def baseline_polygons(labels: np.ndarray) -> dict[int, list[list[np.ndarray]]]:
    """``mlseg.outputs.polygons`` as it was before the memory fix, verbatim."""
    from mlseg.outputs import _cycles, _inside, _split_at_pinches

    labels = np.asarray(labels)
    height, width = labels.shape
    padded = np.pad(labels, 1, mode="constant")
    top = int(padded.max(initial=0))
    if top < (1 << 24):
        present = np.zeros(top + 1, dtype=bool)
        present[padded.ravel()] = True
        present[0] = True
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(ids.size)
        compact = lut[padded]
    else:
        ids, compact = np.unique(padded, return_inverse=True)
        compact = compact.reshape(padded.shape).astype(np.int64)
    # Each edge: label, start (x, y), direction (dx, dy); object on the right (y down).
    parts = []
    # horizontal pixel edges at y = r between padded rows r and r + 1 (image row r-1 / r)
    up, down = compact[:-1, :], compact[1:, :]
    r, c = np.nonzero(up != down)
    y = r
    x = c - 1  # padded column c is image column c - 1
    a, b = up[r, c], down[r, c]
    m = b > 0  # top edge of the lower pixel: left -> right
    parts.append((b[m], x[m], y[m], np.ones(m.sum(), np.int64), np.zeros(m.sum(), np.int64)))
    m = a > 0  # bottom edge of the upper pixel: right -> left
    parts.append((a[m], x[m] + 1, y[m], -np.ones(m.sum(), np.int64), np.zeros(m.sum(), np.int64)))
    left, right = compact[:, :-1], compact[:, 1:]
    r, c = np.nonzero(left != right)
    x = c
    y = r - 1
    a, b = left[r, c], right[r, c]
    m = b > 0  # left edge of the right pixel: bottom -> top
    parts.append((b[m], x[m], y[m] + 1, np.zeros(m.sum(), np.int64), -np.ones(m.sum(), np.int64)))
    m = a > 0  # right edge of the left pixel: top -> bottom
    parts.append((a[m], x[m], y[m], np.zeros(m.sum(), np.int64), np.ones(m.sum(), np.int64)))
    lab, sx, sy, dx, dy = (np.concatenate(p) for p in zip(*parts, strict=True))
    if lab.size == 0:
        return {}
    stride_x = width + 1
    stride_y = (height + 1) * stride_x
    start_key = lab * stride_y + sy * stride_x + sx
    end_key = lab * stride_y + (sy + dy) * stride_x + (sx + dx)
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    succ = order[first]
    # A pinch vertex (two pixels of a label touching diagonally) has two outgoing edges:
    # take the right turn, which keeps hugging the current pixel.
    second = np.minimum(first + 1, order.size - 1)
    pinch = sorted_keys[second] == end_key
    pinch &= first + 1 < order.size
    if pinch.any():
        alt = order[second]
        turn_x, turn_y = -dy, dx  # right turn on screen (y down)
        use_alt = pinch & (dx[alt] == turn_x) & (dy[alt] == turn_y)
        succ = np.where(use_alt, alt, succ)
    pred = np.empty_like(succ)
    pred[succ] = np.arange(succ.size)
    turn = (dx != dx[pred]) | (dy != dy[pred])  # vertex where the direction changes
    out: dict[int, list[list[np.ndarray]]] = {}
    shells: dict[int, list[tuple[int, np.ndarray]]] = {}  # (twice the area, ring)
    holes: dict[int, list[np.ndarray]] = {}
    any_pinch = bool(pinch.any())
    for ring in _cycles(succ):
        corners = ring[turn[ring]]
        traced = np.empty((corners.size + 1, 2), dtype=np.int64)
        traced[:-1, 0] = sx[corners]
        traced[:-1, 1] = sy[corners]
        traced[-1] = traced[0]
        label = int(ids[lab[ring[0]]])
        # a ring through a pinch twice goes round a pocket of background open to the outside
        # only diagonally: two rings, one of them a hole (one ring touching itself is invalid)
        split = any_pinch and bool(pinch[ring].any())
        for closed in _split_at_pinches(traced) if split else (traced,):
            xs, ys = closed[:, 0], closed[:, 1]
            area2 = int(np.dot(xs[:-1], ys[1:]) - np.dot(xs[1:], ys[:-1]))
            if area2 > 0:
                shells.setdefault(label, []).append((area2, closed))
            else:
                holes.setdefault(label, []).append(closed)
    for label, rings_out in shells.items():
        polys = [[shell] for _, shell in rings_out]
        # a hole belongs to the innermost piece around it: a piece may lie in another's hole
        smallest_first = sorted(range(len(polys)), key=lambda i: rings_out[i][0])
        for hole in holes.get(label, []):
            if len(polys) == 1:
                polys[0].append(hole)
                continue
            for i in smallest_first:
                if _inside((hole[0] + hole[1]) / 2.0, polys[i][0]):  # an edge midpoint
                    polys[i].append(hole)
                    break
            else:
                polys[0].append(hole)
        out[label] = polys
    return dict(sorted(out.items()))


def main() -> int:
    from mlseg.outputs import polygons

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4000)
    parser.add_argument("--set", default="cpm15_he")
    args = parser.parse_args()
    labels = field(args.set, args.side)
    ours, peak_ours = peak_of(polygons, labels)
    before, peak_base = peak_of(baseline_polygons, labels)
    if not same_rings(ours, before):
        print("the rings differ from the baseline's", file=sys.stderr)
        return 1
    px = labels.size
    print(
        f"polygons of a {args.side} x {args.side} field of {args.set} masks ({len(ours):,} "
        f"nuclei): ours {peak_ours / 1e6:,.0f} MB ({peak_ours / px:.1f} bytes a pixel), before "
        f"{peak_base / 1e6:,.0f} MB ({peak_base / px:.1f}); ratio {peak_base / peak_ours:.2f}"
    )
    result = {
        "bench": "polygons_memory",
        "side": args.side,
        "nuclei": len(ours),
        "ours_peak_mb": round(peak_ours / 1e6, 1),
        "baseline_peak_mb": round(peak_base / 1e6, 1),
        "ours_bytes_per_pixel": round(peak_ours / px, 2),
        "baseline_bytes_per_pixel": round(peak_base / px, 2),
        "ratio": round(peak_base / peak_ours, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
