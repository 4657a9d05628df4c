"""A rule-based judge: does a generated clip show what its caption says? (No learned model.)

For each object of the caption (``clips.parse_caption``) it measures, on the uint8 video
``[T, H, W, 3]``:

* **color**: foreground pixels (brighter than the background by ``FOREGROUND_LEVEL``) vote for the
  nearest palette color after their brightness is divided out (on the black background an
  anti-aliased or blurred edge is the object's color times a coverage factor). The object's color is
  the vote winner (with two objects: the two largest vote shares).
* **motion**: the object's mask (pixels of its color, at least half as bright as its brightest
  pixels) gives a centroid per frame; a least-squares line through the centroids gives the
  displacement over the clip. The direction is the dominant axis and its sign; it must move at least
  ``MIN_TRAVEL`` of the frame size.
* **shape**: from the object's masks (medians over frames): a triangle's centroid lies below its
  bounding-box centre (1/6 of the height); otherwise the extent along the diagonals relative to the
  axes separates a square (sqrt 2) from a circle (1). The fill ratio (mask / bounding box: circle
  pi/4, square 1, triangle 1/2) is reported too.
* **temporal consistency** (a figure, and a pass/fail): mean IoU of consecutive masks after shifting
  the first by the centroid step (a rigid object that moves keeps ~1), the object present in every
  frame.

``judge(video, caption)`` returns a ``Judgement``; ``judge_grid`` aggregates many into accuracy per
attribute and the overall adherence (all of color, motion and shape right for every object).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .clips import COLORS, ClipSpec, caption, parse_caption

FOREGROUND_LEVEL = 60  # brightness (max channel above background) of a foreground pixel
MASK_FRACTION = 0.5  # object mask: at least this fraction of the object's typical peak brightness
MIN_TRAVEL = 0.12  # minimum displacement over the clip, as a fraction of the frame size
MIN_PIXELS = 6  # an object needs at least this many mask pixels in a frame to count as present
MIN_COLOR_SHARE = 0.05  # a second object's color needs this share of the foreground votes
CONSISTENCY_IOU = 0.6  # temporal consistency passes at this mean shifted IoU
FILL_RATIOS = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}
TRIANGLE_DROP = 1 / 12  # centroid below the box centre (fraction of the height): triangle 1/6, others 0
SQUARE_DIAGONAL = 1.15  # diagonal / axis extent: circle 1, square sqrt(2) (1.22 blurred by sigma 2 px)

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_PALETTE_HUE = _PALETTE / _PALETTE.max(axis=1, keepdims=True)


@dataclass
class ObjectJudgement:
    expected: tuple[str, str, str]  # (color, shape, direction) from the caption
    color: str | None = None
    shape: str | None = None
    direction: str | None = None
    displacement: tuple[float, float] = (0.0, 0.0)  # (dx, dy) pixels over the clip
    fill_ratio: float = float("nan")  # mask area / bounding-box area
    centroid_drop: float = float("nan")  # (centroid - box centre) / box height, vertically
    diagonal_ratio: float = float("nan")  # extent along the diagonals / along the axes
    color_share: float = 0.0  # share of the foreground votes for the object's color
    consistency: float = 0.0  # mean centroid-shifted IoU of consecutive masks
    presence: float = 0.0  # fraction of frames where the object is found

    @property
    def color_ok(self) -> bool:
        return self.color == self.expected[0]

    @property
    def shape_ok(self) -> bool:
        return self.shape == self.expected[1]

    @property
    def motion_ok(self) -> bool:
        return self.direction == self.expected[2]

    @property
    def consistent(self) -> bool:
        return self.presence == 1.0 and self.consistency >= CONSISTENCY_IOU


@dataclass
class Judgement:
    caption: str
    objects: list[ObjectJudgement] = field(default_factory=list)
    held_out: bool = False

    @property
    def color(self) -> bool:
        return all(o.color_ok for o in self.objects)

    @property
    def motion(self) -> bool:
        return all(o.motion_ok for o in self.objects)

    @property
    def shape(self) -> bool:
        return all(o.shape_ok for o in self.objects)

    @property
    def consistent(self) -> bool:
        return all(o.consistent for o in self.objects)

    @property
    def consistency(self) -> float:
        return float(np.mean([o.consistency for o in self.objects]))

    @property
    def adherent(self) -> bool:
        """Color, motion and shape all right for every object."""
        return self.color and self.motion and self.shape

    def summary(self) -> str:
        parts = []
        for o in self.objects:
            dx, dy = o.displacement
            parts.append(
                f"{o.color}/{o.shape}/{o.direction} (want {'/'.join(o.expected)}; fill {o.fill_ratio:.2f}, "
                f"drop {o.centroid_drop:+.2f}, diag {o.diagonal_ratio:.2f}, "
                f"move ({dx:+.1f}, {dy:+.1f}), iou {o.consistency:.2f})"
            )
        verdict = "OK" if self.adherent else "FAIL"
        return f"{verdict} {self.caption!r}: " + "; ".join(parts)


def _brightness_and_hue(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: brightness above the background, and the nearest palette index of its hue."""
    frames = video.astype(np.float32)
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0)
    signal = np.clip(frames - background, 0.0, None)
    brightness = signal.max(axis=-1)
    hue = signal / np.maximum(brightness, 1.0)[..., None]
    distances = ((hue[..., None, :] - _PALETTE_HUE) ** 2).sum(axis=-1)
    return brightness, distances.argmin(axis=-1)


def _shifted_iou(a: np.ndarray, b: np.ndarray, shift: tuple[int, int]) -> float:
    """IoU of mask ``a`` moved by (dy, dx) with mask ``b``."""
    dy, dx = shift
    moved = np.zeros_like(a)
    h, w = a.shape
    src = a[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    moved[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    union = np.logical_or(moved, b).sum()
    return float(np.logical_and(moved, b).sum() / union) if union else 0.0


def classify_shape(centroid_drop: float, diagonal_ratio: float) -> str:
    """A triangle (apex up) is bottom-heavy: its centroid sits 1/6 of its height below the box
    centre. A square reaches sqrt(2) times further along the diagonals than along the axes, a
    circle equally far. Both survive blur (which rounds corners) better than the fill ratio, which
    is only reported."""
    if centroid_drop >= TRIANGLE_DROP:
        return "triangle"
    return "square" if diagonal_ratio > SQUARE_DIAGONAL else "circle"


def _measure_object(obj: ObjectJudgement, mask: np.ndarray, size: int) -> None:
    """Motion, shape and consistency of one object from its masks [T, H, W]."""
    frames = mask.shape[0]
    present = mask.reshape(frames, -1).sum(axis=1) >= MIN_PIXELS
    obj.presence = float(present.mean())
    if present.sum() < 2:
        return
    ys, xs = np.mgrid[: mask.shape[1], : mask.shape[2]]
    times, cx, cy, fills, drops, diagonals = [], [], [], [], [], []
    for t in np.flatnonzero(present):
        m = mask[t]
        area = m.sum()
        px, py = xs[m].astype(np.float64), ys[m].astype(np.float64)
        cx.append(px.mean())
        cy.append(py.mean())
        width, height = np.ptp(px) + 1, np.ptp(py) + 1
        fills.append(area / (width * height))
        drops.append((py.mean() - (py.min() + py.max()) / 2) / height)
        diagonal = (np.ptp(px + py) + np.ptp(px - py)) / (2 * np.sqrt(2)) + 1
        diagonals.append(diagonal / ((width + height) / 2))
        times.append(t)
    times = np.asarray(times, dtype=np.float64)
    span = frames - 1
    dx = float(np.polyfit(times, cx, 1)[0] * span)
    dy = float(np.polyfit(times, cy, 1)[0] * span)
    obj.displacement = (dx, dy)
    if max(abs(dx), abs(dy)) >= MIN_TRAVEL * size:
        if abs(dx) >= abs(dy):
            obj.direction = "right" if dx > 0 else "left"
        else:
            obj.direction = "down" if dy > 0 else "up"
    obj.fill_ratio = float(np.median(fills))
    obj.centroid_drop = float(np.median(drops))
    obj.diagonal_ratio = float(np.median(diagonals))
    obj.shape = classify_shape(obj.centroid_drop, obj.diagonal_ratio)
    centre = {int(t): (y, x) for t, y, x in zip(times, cy, cx)}
    ious = []
    for t in range(frames - 1):
        if t in centre and t + 1 in centre:
            step = (int(round(centre[t + 1][0] - centre[t][0])), int(round(centre[t + 1][1] - centre[t][1])))
            ious.append(_shifted_iou(mask[t], mask[t + 1], step))
    obj.consistency = float(np.mean(ious)) if ious else 0.0


def judge(video: np.ndarray, caption_or_spec: str | ClipSpec) -> Judgement:
    """Score a uint8 video [T, H, W, 3] against its caption (or a ``ClipSpec``)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected a uint8 video [T, H, W, 3], got {video.dtype} {video.shape}")
    if isinstance(caption_or_spec, ClipSpec):
        spec, text = caption_or_spec, caption(caption_or_spec)
    else:
        spec, text = parse_caption(caption_or_spec), caption_or_spec
    result = Judgement(text, held_out=spec.held_out)
    brightness, hue = _brightness_and_hue(video)
    foreground = brightness >= FOREGROUND_LEVEL
    votes = np.bincount(hue[foreground], minlength=len(_PALETTE_NAMES)).astype(np.float64)
    shares = votes / max(votes.sum(), 1.0)
    ranked = [int(i) for i in np.argsort(-shares, kind="stable") if shares[i] > 0]

    # Assign detected colors to the caption's objects: one object takes the winner; two objects take
    # the two largest shares, each object its own color when it is among them.
    detected = ranked[: len(spec.objects)]
    if len(spec.objects) > 1:
        detected = [i for i in detected if shares[i] >= MIN_COLOR_SHARE] or ranked[:1]
    wanted = [_PALETTE_NAMES.index(o.color) for o in spec.objects]
    assignment: list[int | None] = [None] * len(spec.objects)
    free = list(detected)
    for k, w in enumerate(wanted):
        if w in free:
            assignment[k] = w
            free.remove(w)
    for k in range(len(spec.objects)):
        if assignment[k] is None and free:
            assignment[k] = free.pop(0)

    size = min(video.shape[1], video.shape[2])
    for obj_spec, index in zip(spec.objects, assignment):
        obj = ObjectJudgement(expected=obj_spec.combo)
        result.objects.append(obj)
        if index is None:
            continue
        obj.color = _PALETTE_NAMES[index]
        obj.color_share = float(shares[index])
        of_color = foreground & (hue == index)
        peak = np.percentile(brightness[of_color], 90) if of_color.any() else 0.0
        mask = of_color & (brightness >= MASK_FRACTION * peak)
        _measure_object(obj, mask, size)
    return result


@dataclass
class GridScore:
    count: int
    color: float
    motion: float
    shape: float
    consistent: float
    consistency: float  # mean figure
    adherence: float  # color and motion and shape

    def row(self) -> str:
        return (f"n={self.count:4d}  color {self.color:6.1%}  motion {self.motion:6.1%}  shape {self.shape:6.1%}  "
                f"consistent {self.consistent:6.1%} (iou {self.consistency:.2f})  adherence {self.adherence:6.1%}")


def _score(results: Sequence[Judgement]) -> GridScore:
    if not results:
        return GridScore(0, *(float("nan"),) * 6)

    def rate(values: Iterable[bool]) -> float:
        return float(np.mean(list(values)))

    return GridScore(
        count=len(results),
        color=rate(r.color for r in results),
        motion=rate(r.motion for r in results),
        shape=rate(r.shape for r in results),
        consistent=rate(r.consistent for r in results),
        consistency=float(np.mean([r.consistency for r in results])),
        adherence=rate(r.adherent for r in results),
    )


def judge_grid(results: Sequence[Judgement]) -> dict[str, GridScore]:
    """Accuracy per attribute and overall adherence: "all", "in_distribution", "held_out"."""
    return {
        "all": _score(results),
        "in_distribution": _score([r for r in results if not r.held_out]),
        "held_out": _score([r for r in results if r.held_out]),
    }


__all__ = ["GridScore", "Judgement", "ObjectJudgement", "judge", "judge_grid"]
