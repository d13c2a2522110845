"""A synthetic micro-video corpus in the MicroLens layout, deterministic by seed.

Every item has a hidden *topic*. The topic decides what the video looks like (palette, shape
family, motion pattern) and, through the users' topic preferences, which items are watched
after which. So "does video content help recommendation?" has a real answer in this data:

- the next item tends to share the topic of the recent items (session continuity);
- a share of items is *cold*: they appear in very few sequences, and a recommender can only
  reach them through what they look like;
- a share of transitions follows a fixed item-to-item "partner" link that is invisible in the
  pixels, so item IDs carry collaborative signal that content cannot replace.

Titles are only weakly informative: most words are generic, a few come from the topic's
vocabulary and a few from another topic's.

With `unrelated_visuals` (a negative control for content features), each video is drawn from a
seeded random topic of its own, independent of the item's topic: the pixels then say nothing
about behaviour. Titles keep the item's topic words.

Layout written under `out_dir`:

    videos/<item_id>.mp4|.mkv   real videos (libx264 or mpeg4), item ids 1..N without padding
    pairs.tsv                   `user_id<TAB>item_id item_id ...` in time order (MicroLens pairs)
    items.csv                   item_id,file,title
    corpus.json                 parameters, seed, topics and the hidden topic of every item

Nothing here imports flows/, storage/ or recommender/.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Sequence

import av
import numpy as np

# --------------------------------------------------------------------------------------------
# Topics: what a video of each topic looks like and which words its titles may use.
# --------------------------------------------------------------------------------------------

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Topic:
    name: str
    background: tuple[RGB, RGB]  # vertical gradient, top to bottom
    colors: tuple[RGB, ...]  # shape colours
    shape: str  # see _shape_mask
    motion: str  # see _shape_positions
    words: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic("ember", ((60, 10, 0), (200, 60, 10)), ((255, 170, 40), (255, 230, 120), (255, 90, 20)),
          "circle", "rise", ("fire", "ember", "campfire", "flame", "sparks")),
    Topic("ocean", ((0, 30, 90), (0, 120, 170)), ((120, 220, 255), (240, 250, 255), (0, 200, 200)),
          "bar", "drift", ("ocean", "waves", "surf", "tide", "sea")),
    Topic("forest", ((10, 50, 15), (60, 120, 40)), ((30, 160, 50), (150, 210, 80), (90, 60, 20)),
          "triangle", "sway", ("forest", "pine", "hike", "trees", "moss")),
    Topic("candy", ((250, 200, 225), (230, 150, 210)), ((255, 80, 160), (160, 90, 255), (255, 255, 255)),
          "circle", "bounce", ("candy", "sweets", "sugar", "dessert", "lollipop")),
    Topic("neon", ((10, 0, 25), (40, 0, 60)), ((255, 0, 200), (0, 255, 240), (255, 255, 0)),
          "ring", "orbit", ("neon", "club", "party", "lights", "dance")),
    Topic("desert", ((240, 200, 120), (200, 140, 60)), ((150, 90, 30), (250, 230, 170), (110, 60, 20)),
          "square", "slide", ("desert", "dunes", "sand", "camel", "sahara")),
    Topic("night", ((0, 0, 10), (10, 15, 60)), ((255, 255, 255), (200, 210, 255), (255, 240, 150)),
          "cross", "twinkle", ("night", "stars", "sky", "moon", "galaxy")),
    Topic("citrus", ((250, 250, 200), (200, 230, 90)), ((255, 210, 0), (120, 200, 0), (255, 140, 0)),
          "diamond", "pulse", ("lemon", "citrus", "juice", "fruit", "orange")),
    Topic("steel", ((60, 60, 65), (140, 140, 150)), ((220, 220, 230), (30, 30, 35), (170, 180, 200)),
          "square", "zigzag", ("machine", "gears", "factory", "steel", "robot")),
    Topic("garden", ((120, 180, 90), (70, 130, 60)), ((255, 90, 120), (255, 255, 120), (200, 120, 255)),
          "ellipse", "spiral", ("garden", "flowers", "bloom", "petals", "spring")),
)

GENERIC_WORDS = (
    "my", "new", "best", "daily", "vlog", "moment", "today", "watch", "this", "video", "short",
    "clip", "amazing", "look", "part", "two", "one", "first", "time", "trying", "wow", "fun",
    "life", "story", "check", "quick", "tiny", "big", "live", "weekend", "again", "finally",
    "with", "friends", "at", "home", "city", "trip", "morning", "evening", "random", "epic",
)

# Portrait (width, height) sizes from 160x284 to 720x1280; landscape videos swap them. Most are
# small so the corpus encodes fast; a few are large so decoding has to downscale.
SIZES: tuple[tuple[int, int], ...] = (
    (160, 284), (180, 320), (216, 384), (240, 426), (288, 512), (360, 640), (540, 960), (720, 1280),
)
SIZE_WEIGHTS = (0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02)

# (codec, container extension, share)
FORMATS: tuple[tuple[str, str, float], ...] = (
    ("libx264", "mp4", 0.50),
    ("mpeg4", "mp4", 0.30),
    ("libx264", "mkv", 0.12),
    ("mpeg4", "mkv", 0.08),
)


# --------------------------------------------------------------------------------------------
# Parameters and per-item plans
# --------------------------------------------------------------------------------------------


@dataclass
class CorpusParams:
    videos: int = 200
    users: int = 2000
    seed: int = 0
    n_topics: int = len(TOPICS)
    min_duration_s: float = 2.0
    max_duration_s: float = 6.0
    min_fps: int = 12
    max_fps: int = 30
    # Sequence lengths ~ 5 + geometric, clipped (MicroLens drops users with < 5 interactions).
    min_seq_len: int = 5
    max_seq_len: int = 30
    mean_seq_len: float = 12.0
    # Share of items that are cold and how many interactions a cold item gets on average.
    cold_share: float = 0.2
    cold_interactions_per_item: float = 2.0
    # Share of users whose last (test) item is a cold item of the previous item's topic: a
    # positive control for content features (`mvrec demo-data --cold-items 0.3`). The second-to-last
    # (validation) item gets the same draw, so that early stopping and the study's choice of layer
    # see the test split's share of cold targets.
    cold_test_share: float = 0.0
    # Next item: same topic as the previous one with this probability, else from the user's mix.
    p_same_topic: float = 0.6
    # Next item is the previous item's fixed "partner" (ID-only collaborative signal).
    p_partner: float = 0.15
    # Next item is any warm item (exploration noise that stays off the cold tail).
    p_random: float = 0.05
    # Zipf exponent of popularity within a topic.
    zipf_exponent: float = 1.0
    # Draw each video from a random topic unrelated to its item's (a negative control for content
    # features: `mvrec demo-data --unrelated-visuals`). The interactions and titles do not change.
    unrelated_visuals: bool = False
    workers: int = 2

    def check(self) -> None:
        if self.videos < 1:
            raise ValueError(f"videos must be >= 1, got {self.videos}")
        if self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if not 1 <= self.n_topics <= len(TOPICS):
            raise ValueError(f"n_topics must be in 1..{len(TOPICS)}, got {self.n_topics}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0 <= self.cold_share < 1:
            raise ValueError(f"cold_share must be in [0, 1), got {self.cold_share}")
        if not 0 <= self.cold_test_share <= 1:
            raise ValueError(f"cold_test_share must be in [0, 1], got {self.cold_test_share}")
        if not 0 < self.min_duration_s <= self.max_duration_s:
            raise ValueError(f"need 0 < min_duration_s <= max_duration_s, got {self.min_duration_s}, {self.max_duration_s}")
        if not 1 <= self.min_fps <= self.max_fps:
            raise ValueError(f"need 1 <= min_fps <= max_fps, got {self.min_fps}, {self.max_fps}")
        if not 1 <= self.min_seq_len <= self.max_seq_len:
            raise ValueError(f"need 1 <= min_seq_len <= max_seq_len, got {self.min_seq_len}, {self.max_seq_len}")
        if self.p_same_topic + self.p_partner + self.p_random > 1:
            raise ValueError("p_same_topic + p_partner + p_random must be <= 1")


@dataclass
class VideoSpec:
    """Everything needed to render and encode one video; built in the parent so the result
    does not depend on which worker process encodes it."""

    item_id: int
    topic: int
    codec: str
    ext: str
    width: int
    height: int
    fps: int
    n_frames: int
    seed: int  # for the per-video shape layout
    title: str
    look: int | None = None  # the topic the video is drawn from, when not its own (unrelated_visuals)

    @property
    def file(self) -> str:
        return f"videos/{self.item_id}.{self.ext}"


@dataclass
class Interactions:
    sequences: list[list[int]]  # per user (user ids 1..M), item ids in time order
    item_topic: np.ndarray  # [N], topic of item id i at index i-1
    cold_items: list[int]
    partner: np.ndarray  # [N], partner item id of item id i at index i-1
    stats: dict = field(default_factory=dict)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per purpose (and per item), stable under reordering."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


_STREAM_TOPICS, _STREAM_VIDEO, _STREAM_USERS, _STREAM_TITLE, _STREAM_COLD_TEST, _STREAM_LOOK = 1, 2, 3, 4, 5, 6


def assign_topics(n_items: int, n_topics: int, seed: int) -> np.ndarray:
    """Topic per item: every topic used at least once when n_items allows, mildly uneven shares."""
    rng = _rng(seed, _STREAM_TOPICS)
    shares = rng.dirichlet(np.full(n_topics, 5.0))
    base = np.arange(min(n_items, n_topics))
    rest = rng.choice(n_topics, size=n_items - len(base), p=shares)
    topics = np.concatenate([base, rest])
    rng.shuffle(topics)
    return topics.astype(np.int64)


def make_title(topic: int, rng: np.random.Generator, n_topics: int) -> str:
    """3-6 words: mostly generic, sometimes a topic word, now and then a misleading one."""
    words = []
    for _ in range(int(rng.integers(3, 7))):
        u = rng.random()
        if u < 0.12:
            words.append(str(rng.choice(TOPICS[topic].words)))
        elif u < 0.20:
            other = int(rng.integers(n_topics))
            words.append(str(rng.choice(TOPICS[other].words)))
        else:
            words.append(str(rng.choice(GENERIC_WORDS)))
    return " ".join(words).capitalize()


def plan_videos(params: CorpusParams, item_topic: np.ndarray) -> Iterator[VideoSpec]:
    """One VideoSpec per item, lazily (the 5000-video corpus never holds frames in memory)."""
    format_p = np.array([f[2] for f in FORMATS])
    for item_id in range(1, params.videos + 1):
        rng = _rng(params.seed, _STREAM_VIDEO, item_id)
        codec, ext, _ = FORMATS[rng.choice(len(FORMATS), p=format_p / format_p.sum())]
        width, height = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
        if rng.random() < 0.3:  # landscape
            width, height = height, width
        fps = int(rng.integers(params.min_fps, params.max_fps + 1))
        duration = rng.uniform(params.min_duration_s, params.max_duration_s)
        # Stay inside [min, max] seconds after rounding to whole frames.
        n_frames = int(np.clip(round(duration * fps), int(np.ceil(params.min_duration_s * fps)),
                               int(np.floor(params.max_duration_s * fps))))
        topic = int(item_topic[item_id - 1])
        title = make_title(topic, _rng(params.seed, _STREAM_TITLE, item_id), params.n_topics)
        yield VideoSpec(item_id=item_id, topic=topic, codec=codec, ext=ext, width=width,
                        height=height, fps=fps, n_frames=n_frames,
                        seed=int(rng.integers(2**31)), title=title, look=video_look(params, item_id))


def video_look(params: CorpusParams, item_id: int) -> int | None:
    """With unrelated_visuals, the random topic item_id's video is drawn from (its own stream, so
    corpora without the option keep their bytes); else None (its own topic)."""
    if not params.unrelated_visuals:
        return None
    return int(_rng(params.seed, _STREAM_LOOK, item_id).integers(params.n_topics))


# --------------------------------------------------------------------------------------------
# Interactions
# --------------------------------------------------------------------------------------------


def make_interactions(params: CorpusParams, item_topic: np.ndarray | None = None) -> Interactions:
    """User sequences with topic preferences, Zipf popularity, partners and a cold tail."""
    n_items, n_topics = params.videos, params.n_topics
    if item_topic is None:
        item_topic = assign_topics(n_items, n_topics, params.seed)
    rng = _rng(params.seed, _STREAM_USERS)

    # Cold items: a share of each topic, never picked by the popularity draw, only by a rare
    # dedicated draw within the current topic. Keep at least one warm item overall.
    n_cold = min(int(round(params.cold_share * n_items)), n_items - 1)
    cold = np.zeros(n_items, dtype=bool)
    cold[rng.choice(n_items, size=n_cold, replace=False)] = True

    used_topics = np.unique(item_topic)
    warm_by_topic: dict[int, np.ndarray] = {}
    cold_by_topic: dict[int, np.ndarray] = {}
    warm_cdf: dict[int, np.ndarray] = {}
    for t in used_topics:
        members = np.flatnonzero(item_topic == t)
        warm = members[~cold[members]]
        if len(warm) == 0:  # a tiny topic whose items are all cold: let them be drawn anyway
            warm = members
        warm = rng.permutation(warm)  # popularity rank within the topic
        weights = 1.0 / np.arange(1, len(warm) + 1) ** params.zipf_exponent
        warm_by_topic[int(t)] = warm
        warm_cdf[int(t)] = np.cumsum(weights) / weights.sum()
        cold_by_topic[int(t)] = members[cold[members]]

    # Partner of each item: a warm item of any topic, fixed per item (item-to-item signal).
    warm_all = np.flatnonzero(~cold) if (~cold).any() else np.arange(n_items)
    partner = rng.choice(warm_all, size=n_items)

    lengths = params.min_seq_len + rng.geometric(
        1.0 / max(1.0, params.mean_seq_len - params.min_seq_len + 1), size=params.users) - 1
    # Few items (tiny test corpora): cap lengths so sequences need not repeat items much.
    cap = max(params.min_seq_len, min(params.max_seq_len, n_items // 2))
    lengths = np.clip(lengths, params.min_seq_len, cap)

    expected_steps = float(lengths.sum())
    p_cold = min(0.25, params.cold_interactions_per_item * n_cold / max(expected_steps, 1.0))

    def draw_in_topic(t: int) -> int:
        if len(cold_by_topic[t]) and rng.random() < p_cold:
            return int(rng.choice(cold_by_topic[t]))
        k = int(np.searchsorted(warm_cdf[t], rng.random(), side="right"))
        return int(warm_by_topic[t][min(k, len(warm_by_topic[t]) - 1)])

    sequences: list[list[int]] = []
    for length in lengths:
        # A mixture over 1-3 topics.
        k = int(rng.integers(1, min(3, len(used_topics)) + 1))
        liked = rng.choice(used_topics, size=k, replace=False)
        mix = rng.dirichlet(np.ones(k))
        seq: list[int] = []
        seen: set[int] = set()
        prev: int | None = None
        for _ in range(int(length)):
            for _attempt in range(10):  # avoid repeats; tolerate them when items run out
                u = 1.0 if prev is None else rng.random()  # the first item comes from the mix
                if u < params.p_partner:
                    item = int(partner[prev])
                elif u < params.p_partner + params.p_random:
                    item = int(rng.choice(warm_all))  # exploration stays off the cold tail
                elif u < params.p_partner + params.p_random + params.p_same_topic:
                    item = draw_in_topic(int(item_topic[prev]))
                else:
                    item = draw_in_topic(int(rng.choice(liked, p=mix)))
                if item not in seen:
                    break
            seq.append(item)
            seen.add(item)
            prev = item
        sequences.append([i + 1 for i in seq])  # item ids are 1-based

    if params.cold_test_share > 0:  # own stream: corpora without it keep their bytes
        crng = _rng(params.seed, _STREAM_COLD_TEST)
        for s in sequences:
            for pos in (len(s) - 2, len(s) - 1):  # the validation target, then the test target
                pool = cold_by_topic.get(int(item_topic[s[pos - 1] - 1]), []) if pos >= 1 else []
                pool = [i + 1 for i in pool if i + 1 not in s]
                if pool and crng.random() < params.cold_test_share:
                    s[pos] = int(crng.choice(pool))

    counts = np.bincount(np.concatenate([np.asarray(s) for s in sequences]) - 1, minlength=n_items)
    stats = {
        "interactions": int(counts.sum()),
        "mean_seq_len": float(np.mean([len(s) for s in sequences])),
        "items_never_seen": int((counts == 0).sum()),
        "cold_mean_interactions": float(counts[cold].mean()) if n_cold else 0.0,
        "warm_mean_interactions": float(counts[~cold].mean()),
    }
    return Interactions(sequences=sequences, item_topic=item_topic,
                        cold_items=[int(i) + 1 for i in np.flatnonzero(cold)],
                        partner=partner + 1, stats=stats)


# --------------------------------------------------------------------------------------------
# Rendering: vectorised numpy drawing, only inside each shape's bounding box
# --------------------------------------------------------------------------------------------


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx, dy: offsets from the centre in units of the shape radius (broadcastable)."""
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= 1.0) & (r2 >= 0.45)
    if shape == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    if shape == "triangle":  # pointing up
        return (dy <= 0.8) & (np.abs(dx) <= (dy + 1.0) * 0.55)
    if shape == "cross":
        return ((np.abs(dx) <= 0.25) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.25) & (np.abs(dx) <= 1.0))
    if shape == "ellipse":
        return (dx / 1.0) ** 2 + (dy / 0.55) ** 2 <= 1.0
    if shape == "bar":  # a wide horizontal band: reads as waves when drifting
        return (np.abs(dy) <= 0.3) & (np.abs(dx) <= 3.0)
    raise ValueError(f"unknown shape {shape!r}")


_SHAPE_EXTENT = {"bar": 3.0}  # half-width of the bounding box in radii (default 1)


def _shape_positions(motion: str, t: float, x0: np.ndarray, y0: np.ndarray, speed: np.ndarray,
                     phase: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (x, y in [0, 1] of width/height) and a size scale of every shape at time t."""
    one = np.ones_like(x0)
    two_pi = 2 * np.pi
    if motion == "rise":
        return x0 + 0.03 * np.sin(two_pi * t + phase), (y0 - speed * t) % 1.2 - 0.1, one
    if motion == "drift":
        return (x0 + speed * t) % 1.6 - 0.3, y0, one
    if motion == "sway":
        return x0 + 0.08 * np.sin(two_pi * 0.6 * t + phase), y0, one
    if motion == "bounce":
        return x0, 0.85 - 0.6 * np.abs(np.sin(np.pi * (0.8 + speed) * t + phase)) * y0, one
    if motion == "orbit":
        angle = phase + two_pi * (0.2 + speed) * t
        radius = 0.15 + 0.3 * y0
        return 0.5 + radius * np.cos(angle), 0.5 + radius * np.sin(angle), one
    if motion == "slide":  # move in steps, like blocks being pushed
        step = np.floor(t * 2 + phase) / 2
        return (x0 + 0.15 * step * np.sign(speed - 0.2)) % 1.0, y0, one
    if motion == "twinkle":
        return x0, y0, 0.5 + 0.5 * (np.sin(two_pi * (1 + 2 * speed) * t + phase) > 0)
    if motion == "pulse":
        return x0, y0, 0.6 + 0.4 * np.sin(two_pi * 1.2 * t + phase)
    if motion == "zigzag":
        tri = 2 * np.abs((t * (0.5 + speed) + phase / two_pi) % 1.0 - 0.5)
        return 0.15 + 0.7 * tri, (y0 + 0.05 * t) % 1.0, one
    if motion == "spiral":
        angle = phase + two_pi * 0.3 * t
        radius = 0.05 + (0.35 * y0 + 0.08 * t) % 0.4
        return 0.5 + radius * np.cos(angle), 0.5 + radius * np.sin(angle), one
    raise ValueError(f"unknown motion {motion!r}")


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range Y, U, V (what decoders assume for SD video) of RGB [..., 3]."""
    f = np.asarray(rgb, dtype=np.float64)
    y = 16.0 + (65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255.0
    u = 128.0 + (-37.797 * f[..., 0] - 74.203 * f[..., 1] + 112.0 * f[..., 2]) / 255.0
    v = 128.0 + (112.0 * f[..., 0] - 93.786 * f[..., 1] - 18.214 * f[..., 2]) / 255.0
    return np.clip(np.rint(np.stack([y, u, v], axis=-1)), 0, 255).astype(np.uint8)


@dataclass
class _Layout:
    """Per-video random layout: shapes, colours and the background, derived from spec.seed."""

    background: np.ndarray  # [H*3/2, W] uint8, yuv420p planes stacked as PyAV wants them
    x0: np.ndarray
    y0: np.ndarray
    speed: np.ndarray
    phase: np.ndarray
    radius: np.ndarray  # in pixels
    colors_yuv: np.ndarray  # [S, 3] uint8


def _planes(buffer: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y [H, W], U and V [H/2, W/2] views into a stacked yuv420p buffer."""
    flat = buffer.reshape(-1)
    luma, chroma = height * width, (height // 2) * (width // 2)
    return (flat[:luma].reshape(height, width),
            flat[luma:luma + chroma].reshape(height // 2, width // 2),
            flat[luma + chroma:].reshape(height // 2, width // 2))


def _layout(spec: VideoSpec, topic: Topic) -> _Layout:
    rng = np.random.default_rng(spec.seed)
    jitter = rng.integers(-20, 21, size=(2, 3))  # the same topic, never quite the same palette
    top = np.clip(np.array(topic.background[0]) + jitter[0], 0, 255)
    bottom = np.clip(np.array(topic.background[1]) + jitter[1], 0, 255)
    H, W = spec.height, spec.width
    ramp = np.linspace(0.0, 1.0, H)[:, None]
    column = top[None, :] * (1 - ramp) + bottom[None, :] * ramp  # [H, 3] RGB gradient
    background = np.empty((H * 3 // 2, W), dtype=np.uint8)
    y, u, v = _planes(background, H, W)
    y[:] = rgb_to_yuv(column)[:, None, 0]
    chroma = rgb_to_yuv(column.reshape(H // 2, 2, 3).mean(axis=1))  # one chroma row per 2 rows
    u[:], v[:] = chroma[:, None, 1], chroma[:, None, 2]

    n = int(rng.integers(3, 9))
    palette = np.array(topic.colors, dtype=np.int64)
    colors = palette[rng.integers(len(palette), size=n)] + rng.integers(-15, 16, size=(n, 3))
    short_side = min(W, H)
    return _Layout(
        background=background,
        x0=rng.uniform(0.1, 0.9, n), y0=rng.uniform(0.1, 0.9, n),
        speed=rng.uniform(0.05, 0.35, n), phase=rng.uniform(0, 2 * np.pi, n),
        radius=rng.uniform(0.06, 0.16, n) * short_side,
        colors_yuv=rgb_to_yuv(np.clip(colors, 0, 255)),
    )


def _draw(plane: np.ndarray, value: int, shape: str, cx: float, cy: float, r: float, extent: float,
          step: int) -> None:
    """Fill one shape into a plane whose samples sit every `step` luma pixels."""
    h, w = plane.shape
    offset = (step - 1) / 2  # a chroma sample's centre in luma coordinates is 2*i + 0.5
    x_lo, x_hi = max(0, int((cx - extent * r) / step)), min(w, int((cx + extent * r) / step) + 1)
    y_lo, y_hi = max(0, int((cy - r) / step)), min(h, int((cy + r) / step) + 1)
    if x_lo >= x_hi or y_lo >= y_hi:
        return
    dx = (np.arange(x_lo, x_hi, dtype=np.float32) * step + offset - cx)[None, :] / r
    dy = (np.arange(y_lo, y_hi, dtype=np.float32) * step + offset - cy)[:, None] / r
    plane[y_lo:y_hi, x_lo:x_hi][_shape_mask(shape, dx, dy)] = value


def render_frames(spec: VideoSpec) -> Iterator[np.ndarray]:
    """Frames as stacked yuv420p arrays [H*3/2, W] uint8 (av.VideoFrame.from_ndarray format).

    Drawn straight in YUV: converting RGB frames cost three quarters of the encode time.
    """
    topic = TOPICS[spec.topic if spec.look is None else spec.look]
    lay = _layout(spec, topic)
    extent = _SHAPE_EXTENT.get(topic.shape, 1.0)
    H, W = spec.height, spec.width
    for index in range(spec.n_frames):
        t = index / spec.fps
        frame = lay.background.copy()
        y, u, v = _planes(frame, H, W)
        xs, ys, scale = _shape_positions(topic.motion, t, lay.x0, lay.y0, lay.speed, lay.phase)
        for cx, cy, s, r, color in zip(xs * W, ys * H, scale, lay.radius, lay.colors_yuv, strict=True):
            r = max(2.0, float(r * s))
            _draw(y, int(color[0]), topic.shape, cx, cy, r, extent, step=1)
            _draw(u, int(color[1]), topic.shape, cx, cy, r, extent, step=2)
            _draw(v, int(color[2]), topic.shape, cx, cy, r, extent, step=2)
        yield frame


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _open_output(path: Path) -> av.container.OutputContainer:
    # bitexact: no random Matroska segment UID and no library version strings, so the same
    # seed gives the same file bytes on the same PyAV/FFmpeg build.
    return av.open(str(path), mode="w", options={"fflags": "+bitexact"})


def encode_video(spec: VideoSpec, out_dir: str | Path) -> dict:
    """Render and encode one video; returns its metadata row."""
    path = Path(out_dir) / spec.file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)  # a crash never leaves a half file
    with _open_output(tmp) as container:
        stream = container.add_stream(spec.codec, rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.codec_context.thread_count = 1  # one process per core already
        if spec.codec == "libx264":
            # mbtree off: its SIMD lookahead made the bitstream differ from run to run.
            stream.options = {"preset": "veryfast", "crf": "26", "x264-params": "mbtree=0"}
        else:  # mpeg4: a bitrate that keeps small frames clean
            stream.bit_rate = int(max(150_000, spec.width * spec.height * spec.fps * 0.12))
            stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.time_base = Fraction(1, spec.fps)
        for index, yuv in enumerate(render_frames(spec)):
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts, frame.time_base = index, Fraction(1, spec.fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return {"item_id": spec.item_id, "file": spec.file, "title": spec.title,
            "bytes": path.stat().st_size}


def _encode_task(args: tuple[VideoSpec, str]) -> dict:
    return encode_video(*args)


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


def write_pairs(sequences: Sequence[Sequence[int]], path: Path) -> None:
    """MicroLens pairs: `user_id<TAB>item_id item_id ...`, user ids 1..M, no header."""
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for user_id, seq in enumerate(sequences, start=1):
            fh.write(f"{user_id}\t{' '.join(map(str, seq))}\n")


def _clear_previous_corpus(out: Path) -> None:
    """Rewriting a demo corpus in place must not leave videos of a bigger earlier one behind;
    anything that is not a demo corpus is left alone and refused."""
    videos = out / "videos"
    if not videos.is_dir() or not any(videos.iterdir()):
        return
    try:
        previous = json.loads((out / "corpus.json").read_text(encoding="utf-8")).get("format", "")
    except (OSError, ValueError):
        previous = ""
    if not str(previous).startswith("mvrec-demo-corpus/"):
        raise ValueError(f"{videos} already holds files and is not a demo corpus; choose an empty --out")
    for path in videos.iterdir():
        if path.is_file() and path.suffix in {".mp4", ".mkv"}:
            path.unlink()


def make_demo_corpus(
    out_dir: str | Path,
    videos: int = 200,
    users: int = 2000,
    seed: int = 0,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    **overrides,
) -> dict:
    """Write the corpus under out_dir and return the contents of corpus.json.

    progress(done, total) is called after each video. Extra keyword arguments set other
    CorpusParams fields (e.g. cold_share=0.3). Same arguments, same bytes.
    """
    params = CorpusParams(videos=videos, users=users, seed=seed, workers=workers, **overrides)
    params.check()
    out = Path(out_dir)
    _clear_previous_corpus(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)

    item_topic = assign_topics(params.videos, params.n_topics, params.seed)
    interactions = make_interactions(params, item_topic)
    write_pairs(interactions.sequences, out / "pairs.tsv")

    # Stream: specs are made lazily, videos are encoded in a pool and items.csv is written in
    # item order as results come back, so memory stays flat for 5000 videos.
    specs = plan_videos(params, item_topic)
    total_bytes = 0
    with (out / "items.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["item_id", "file", "title"])
        if params.workers == 1:
            results: Iterator[dict] = (encode_video(s, out) for s in specs)
            pool = None
        else:
            # spawn: no fork of a parent that may hold threads (Rich's refresh thread).
            pool = multiprocessing.get_context("spawn").Pool(params.workers)
            results = pool.imap(_encode_task, ((s, str(out)) for s in specs), chunksize=4)
        try:
            for done, row in enumerate(results, start=1):
                writer.writerow([row["item_id"], row["file"], row["title"]])
                total_bytes += row["bytes"]
                if progress is not None:
                    progress(done, params.videos)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    meta = {
        "format": "mvrec-demo-corpus/1",
        # workers is left out: it changes speed, never the output.
        "params": {k: v for k, v in asdict(params).items() if k != "workers"},
        "files": {"pairs": "pairs.tsv", "items": "items.csv", "videos": "videos/"},
        "topics": [{"id": i, **asdict(t)} for i, t in enumerate(TOPICS[: params.n_topics])],
        "stats": {**interactions.stats, "video_bytes": total_bytes},
        # Hidden ground truth, for analysis only: never a model input.
        "item_topic": {str(i + 1): int(t) for i, t in enumerate(item_topic)},
        "cold_items": interactions.cold_items,
        # The topic each video is drawn from, where it is not the item's own.
        **({"video_look": {str(i): video_look(params, i) for i in range(1, params.videos + 1)}}
           if params.unrelated_visuals else {}),
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


if __name__ == "__main__":  # python -m mvrec.devtools.demo_data OUT [videos] [users] [seed]
    import sys
    import time

    args = sys.argv[1:]
    start = time.perf_counter()
    info = make_demo_corpus(args[0], *(int(a) for a in args[1:4]))
    print(json.dumps(info["stats"]), f"{time.perf_counter() - start:.1f}s")
