"""Training data of the generator: corpora of subject folders, the two phases' samplers, batches.

- Phase 1, monocular-temporal: sources and targets are frames of one camera of one subject
  at different times (a monocular video).
- Phase 2, multi-view-spatial: sources are K cameras of a multi-view subject at one time,
  targets other cameras at that time; a ``cross_time`` share of the samples (25% by default)
  takes its targets from another time instead.
- K is drawn uniformly from {1, 2, 3, 4} for every step (one K per step, so a batch is a
  dense [B, K, ...] tensor).

A corpus is loaded once into memory (uint8, on the training device when it fits), so a step
only indexes tensors. Subjects are sharded across DDP ranks like a DistributedSampler
(``shard``): rank r loads and samples subjects r, r + world, r + 2 world, ...
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from backend.data.subject import Subject, frame_name
from backend.generate.model import MAX_SOURCES, SourceViews, grid_coords, sample_maps
from backend.head.model import HeadModel
from backend.head.params import POSE_FIELDS, FlameParams
from backend.render.camera import Cameras, project
from backend.wire.errors import InputError

Progress = Callable[[int, int], None]


def find_subjects(paths: Sequence[str | Path], max_depth: int = 3) -> list[Path]:
    """Subject folders named by ``paths``: each is a subject folder or a folder searched (up to
    ``max_depth`` levels) for them. Sorted, without duplicates."""
    found: set[Path] = set()
    hits = [0]

    def walk(p: Path, depth: int) -> None:
        if (p / "subject.json").is_file():
            found.add(p.resolve())
            hits[0] += 1
            return
        if depth >= max_depth:
            return
        for child in sorted(p.iterdir()):
            if child.is_dir():
                walk(child, depth + 1)

    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            raise InputError(f"data folder not found: {p}")
        hits[0] = 0
        walk(p, 0)
        if not hits[0]:
            raise InputError(f"{p}: no subject folders (with subject.json) found within {max_depth} levels")
    return sorted(found)


def shard(items: Sequence, rank: int, world: int) -> list:
    """This rank's share of ``items`` (every item when there are fewer items than ranks)."""
    items = list(items)
    return items[rank::world] if len(items) >= world else items


def _read_u8(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"missing frame file {path}") from None
    except OSError as exc:
        raise InputError(f"unreadable image {path} ({exc})") from exc


@dataclass
class LoadedSubject:
    """A subject held in memory.

    Attributes:
        pixels: [T, C, H, W, 4] uint8: RGB composited over the background, then the mask.
        params: FLAME parameters conformed to the head model (per-frame fields [T, k]).
        K, world_to_cam: [T, C, 3, 3], [T, C, 4, 4].
    """

    name: str
    root: Path
    pixels: torch.Tensor
    params: FlameParams
    K: torch.Tensor
    world_to_cam: torch.Tensor

    @property
    def frames(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def cameras(self) -> int:
        return int(self.pixels.shape[1])


def load_subject(root: Path, head: HeadModel, device: torch.device | str = "cpu", threads: int = 8) -> LoadedSubject:
    subject = Subject.load(root)
    if subject.info.head_model != head.name:
        raise InputError(f"subject {root} was made with head model '{subject.info.head_model}', training uses '{head.name}'")
    t_n, c_n = subject.num_frames, subject.num_cameras
    bg = np.asarray(subject.info.background, np.float32)
    names = [(t, c) for t in range(t_n) for c in range(c_n)]

    def read(tc: tuple[int, int]) -> np.ndarray:
        rgb = _read_u8(root / "images" / frame_name(*tc), "RGB").astype(np.float32)
        mask = _read_u8(root / "masks" / frame_name(*tc), "L")
        m = mask[..., None].astype(np.float32) / 255.0
        comp = rgb * m + bg * 255.0 * (1 - m)
        return np.concatenate([np.clip(comp + 0.5, 0, 255).astype(np.uint8), mask[..., None]], -1)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        frames = list(pool.map(read, names))
    h, w = frames[0].shape[:2]
    if (w, h) != (subject.info.width, subject.info.height) or any(f.shape[:2] != (h, w) for f in frames):
        raise InputError(f"{root}: frame sizes disagree with subject.json ({subject.info.width}x{subject.info.height})")
    pixels = torch.from_numpy(np.stack(frames).reshape(t_n, c_n, h, w, 4))
    params = subject.params.conformed(head.n_shape, head.n_expr)
    return LoadedSubject(subject.info.name, root, pixels.to(device), params.to(device), subject.K.to(device), subject.world_to_cam.to(device))


# A subject whose landmarks fall outside its own person mask more often than this, in the
# frames checked, shows a head other than the one its parameters and cameras place.
MIN_LANDMARKS_IN_MASK = 0.8


@torch.no_grad()
def landmarks_in_mask(subject: LoadedSubject, head: HeadModel, frames: int = 5) -> float:
    """Share of the head's 68 landmarks that land inside the subject's own person mask (> 0.5)
    over every camera, the median over up to ``frames`` frames spread through the clip (so
    one badly tracked frame does not condemn a clip).

    The subject's images and its parameters must agree: a corpus whose renders were made
    with another pose, camera or head trains a generator that matches nothing, and the
    network learns to draw nothing at all. About 1 for a sound subject.
    """
    device = head.v_template.device
    t = torch.linspace(0, subject.frames - 1, min(frames, subject.frames)).round().long().unique()
    lmk = head.landmarks(head(subject.params.index(t.tolist()).to(device)).vertices).cpu()  # [T, 68, 3]
    h, w = subject.pixels.shape[2:4]
    uv, depth = project(lmk, Cameras(subject.K[t].cpu(), subject.world_to_cam[t].cpu(), w, h))  # [T, C, 68, 2]
    xy_norm = grid_coords(uv, (h, w)).flatten(0, 1)  # [T * C, 68, 2]
    mask = subject.pixels[t][..., 3].cpu().flatten(0, 1)[:, None].float() / 255.0  # [T * C, 1, H, W]
    hit = (sample_maps(mask, xy_norm)[..., 0] > 0.5) & (xy_norm.abs() <= 1).all(-1) & (depth.flatten(0, 1) > 0)
    return float(hit.reshape(len(t), -1).float().mean(1).median())


def pose_rows(head: HeadModel, shapes: torch.Tensor, rows: dict[str, torch.Tensor], static_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Posed vertices of R parameter rows with per-row identities, in one LBS call.

    ``HeadModel.forward`` shares one identity across its batch; a training batch mixes
    identities. Same formulas (``HeadModel.skin``, then the translation).

    Args:
        shapes: [R, n_shape] identity per row (already conformed to the head).
        rows: per-frame FLAME fields, each [R, k] (expr conformed to the head).
        static_offsets: optional [R, V, 3].
    Returns:
        [R, V, 3] vertices, metres.
    """
    coeffs = torch.cat([shapes, rows["expr"]], dim=1)
    pose = torch.cat([rows["rotation"], rows["neck_pose"], rows["jaw_pose"], rows["eyes_pose"]], dim=1)
    template = head.v_template.expand(shapes.shape[0], -1, -1)
    if static_offsets is not None:
        template = template + static_offsets
    verts, _ = head.skin(coeffs, pose, template)
    return verts + rows["translation"][:, None]


@dataclass(frozen=True)
class Sample:
    """One training example: K source views and the target views of one subject."""

    subject: int
    sources: tuple[tuple[int, int], ...]  # (frame, camera)
    targets: tuple[tuple[int, int], ...]
    cross_time: bool = False


@dataclass
class Batch:
    """B samples with K sources and T targets each, on one device.

    Attributes:
        sources: SourceViews [B, K, ...].
        target_rgb: [B*T, H, W, 3]; target_mask: [B*T, H, W, 1].
        target_vertices: [B*T, V, 3]; target_K / target_world_to_cam: [B*T, 3, 3] / [B*T, 4, 4].
        background: [3].
        cross_time: [B] bool.
    """

    sources: SourceViews
    target_rgb: torch.Tensor
    target_mask: torch.Tensor
    target_vertices: torch.Tensor
    target_K: torch.Tensor
    target_world_to_cam: torch.Tensor
    background: torch.Tensor
    targets_per_sample: int
    cross_time: torch.Tensor

    @property
    def size(self) -> int:
        return self.sources.batch

    def split(self, parts: int, index: int) -> Batch:
        """Samples [index * B / parts, (index + 1) * B / parts) of this batch (for DDP tests)."""
        b = self.size
        if b % parts:
            raise ValueError(f"batch of {b} does not split into {parts} parts")
        lo, hi = index * b // parts, (index + 1) * b // parts
        t = self.targets_per_sample
        s = self.sources
        src = SourceViews(s.images[lo:hi], s.masks[lo:hi], s.vertices[lo:hi], s.K[lo:hi], s.world_to_cam[lo:hi], None if s.valid is None else s.valid[lo:hi])
        tl, th = lo * t, hi * t
        return Batch(
            src,
            self.target_rgb[tl:th],
            self.target_mask[tl:th],
            self.target_vertices[tl:th],
            self.target_K[tl:th],
            self.target_world_to_cam[tl:th],
            self.background,
            t,
            self.cross_time[lo:hi],
        )


class Corpus:
    """Subjects loaded into memory, all of one image size and background.

    Every subject's views and frames sit in flat device tensors, so a batch is a few gathers
    behind one index upload (pinned, non-blocking on CUDA): the host never waits for the
    device while it prepares the next step.

    Attributes:
        pixels: [V, H, W, 4] uint8, every subject's views (frame-major: frame * C + camera).
        K, world_to_cam: [V, 3, 3], [V, 4, 4].
        rows: per-frame FLAME fields ("expr" and the pose fields), each [F, k].
        shapes: [S, n_shape]; static_offsets: [S, V_head, 3] or None when no subject has one.
    """

    def __init__(self, roots: Sequence[Path], head: HeadModel, device: torch.device | str = "cpu", threads: int = 8, progress: Progress | None = None) -> None:
        if not roots:
            raise InputError("the corpus is empty: no subject folders given")
        self.head = head
        self.device = torch.device(device)
        subjects: list[LoadedSubject] = []
        for i, root in enumerate(roots):
            subjects.append(load_subject(Path(root), head, "cpu", threads))
            if progress:
                progress(i + 1, len(roots))
        agreement = {str(s.root): landmarks_in_mask(s, head) for s in subjects}
        astray = sorted((share, name) for name, share in agreement.items() if share < MIN_LANDMARKS_IN_MASK)
        if astray:
            listed = ", ".join(f"{name} {share:.0%}" for share, name in astray[:5])
            raise InputError(
                f"{len(astray)} of {len(subjects)} subjects do not show the head their parameters and cameras place "
                f"(landmarks inside the person mask: {listed}{', ...' if len(astray) > 5 else ''}); "
                "regenerate or re-track them, or leave them out"
            )
        sizes = {tuple(s.pixels.shape[2:4]) for s in subjects}
        if len(sizes) != 1:
            raise InputError(f"corpus subjects have different image sizes {sorted(sizes)}; regenerate them at one size")
        backgrounds = {json.dumps(Subject.load(s.root, check_images=False).info.background) for s in subjects}
        if len(backgrounds) != 1:
            raise InputError(f"corpus subjects have different backgrounds {sorted(backgrounds)}")
        self.background = torch.tensor(json.loads(backgrounds.pop()), dtype=torch.float32, device=self.device)
        self.height, self.width = sizes.pop()
        self._layouts = [(s.frames, s.cameras) for s in subjects]
        self._view_start = np.cumsum([0] + [f * c for f, c in self._layouts])[:-1].tolist()
        self._frame_start = np.cumsum([0] + [f for f, _ in self._layouts])[:-1].tolist()

        def flat(get) -> torch.Tensor:  # type: ignore[no-untyped-def]
            return torch.cat([get(s).flatten(0, 1) for s in subjects]).to(self.device)

        self.pixels = flat(lambda s: s.pixels)
        self.K = flat(lambda s: s.K)
        self.world_to_cam = flat(lambda s: s.world_to_cam)
        self.rows = {name: torch.cat([getattr(s.params, name) for s in subjects]).to(self.device) for name in ("expr", *POSE_FIELDS)}
        self.shapes = torch.stack([s.params.shape.reshape(-1) for s in subjects]).to(self.device)
        offsets = [s.params.static_offset for s in subjects]
        self.static_offsets = None if all(o is None for o in offsets) else torch.stack([torch.zeros_like(head.v_template) if o is None else o.reshape(head.v_template.shape) for o in offsets]).to(self.device)

    def __len__(self) -> int:
        return len(self._layouts)

    def layouts(self) -> list[tuple[int, int]]:
        """(frames, cameras) of every subject."""
        return list(self._layouts)

    def _upload(self, rows: list[list[int]]) -> torch.Tensor:
        """[R, C] int64 on the device, without a host-device synchronization."""
        table = torch.tensor(rows, dtype=torch.int64)
        if self.device.type == "cuda":
            table = table.pin_memory()
        return table.to(self.device, non_blocking=True)

    def batch(self, samples: Sequence[Sample]) -> Batch:
        """Gather the images, cameras and posed heads of ``samples`` (all with the same K and T)."""
        ks = {len(s.sources) for s in samples}
        ts = {len(s.targets) for s in samples}
        if len(ks) != 1 or len(ts) != 1:
            raise ValueError("every sample of a batch needs the same number of sources and of targets")
        k, t = ks.pop(), ts.pop()
        b = len(samples)
        table = []  # one row per view: flat view, flat frame, subject, cross-time flag
        for sample in samples:
            s = sample.subject
            frames, cams = self._layouts[s]
            for f, c in (*sample.sources, *sample.targets):
                if not (0 <= f < frames and 0 <= c < cams):
                    raise ValueError(f"view (frame {f}, camera {c}) is outside subject #{s}'s {frames} frames x {cams} cameras")
                table.append([self._view_start[s] + f * cams + c, self._frame_start[s] + f, s, int(sample.cross_time)])
        view, frame, subject, cross = self._upload(table).unbind(1)
        with torch.no_grad():
            verts = pose_rows(
                self.head,
                self.shapes[subject],
                {name: v[frame] for name, v in self.rows.items()},
                None if self.static_offsets is None else self.static_offsets[subject],
            ).reshape(b, k + t, -1, 3)
        pix = (self.pixels[view].float() / 255.0).reshape(b, k + t, self.height, self.width, 4)
        cam_k = self.K[view].reshape(b, k + t, 3, 3)
        w2c = self.world_to_cam[view].reshape(b, k + t, 4, 4)
        tgt_pix = pix[:, k:].flatten(0, 1)  # [B*T, H, W, 4]
        sources = SourceViews(
            images=pix[:, :k, ..., :3],
            masks=pix[:, :k, ..., 3:],
            vertices=verts[:, :k],
            K=cam_k[:, :k],
            world_to_cam=w2c[:, :k],
        )
        return Batch(
            sources=sources,
            target_rgb=tgt_pix[..., :3],
            target_mask=tgt_pix[..., 3:],
            target_vertices=verts[:, k:].reshape(b * t, -1, 3),
            target_K=cam_k[:, k:].flatten(0, 1),
            target_world_to_cam=w2c[:, k:].flatten(0, 1),
            background=self.background,
            targets_per_sample=t,
            cross_time=cross.reshape(b, k + t)[:, 0].bool(),
        )


class PhaseSampler:
    """Draws training samples for phase 1 or 2.

    Args:
        layouts: (frames, cameras) of every subject in this rank's corpus.
        phase: 1 (monocular-temporal) or 2 (multi-view-spatial).
        targets: target views per sample.
        cross_time: phase 2's share of samples whose targets come from another time.
        seed: an int or a sequence of ints (e.g. [seed, rank, start step]).
    """

    def __init__(self, layouts: Sequence[tuple[int, int]], phase: int, targets: int = 2, cross_time: float = 0.25, seed: int | Sequence[int] = 0) -> None:
        if phase not in (1, 2):
            raise InputError(f"phase must be 1 or 2, got {phase}")
        if not 0.0 <= cross_time <= 1.0:
            raise InputError(f"cross-time share must be in [0, 1], got {cross_time}")
        if not layouts:
            raise InputError("no subjects to sample from")
        self.layouts = list(layouts)
        self.phase = phase
        self.targets = targets
        self.cross_time = cross_time
        for i, (frames, cams) in enumerate(self.layouts):
            if phase == 1 and frames < MAX_SOURCES + 1:
                raise InputError(f"phase 1 needs subjects with at least {MAX_SOURCES + 1} frames; subject #{i} has {frames}")
            if phase == 2 and cams < MAX_SOURCES + 1:
                raise InputError(f"phase 2 needs multi-view subjects with at least {MAX_SOURCES + 1} cameras; subject #{i} has {cams}")
        self.rng = np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)

    def draw_k(self) -> int:
        """K uniform in {1, 2, 3, 4}."""
        return int(self.rng.integers(1, MAX_SOURCES + 1))

    def _pick(self, pool: np.ndarray, count: int) -> np.ndarray:
        return self.rng.choice(pool, count, replace=len(pool) < count)

    def sample(self, k: int) -> Sample:
        if not 1 <= k <= MAX_SOURCES:
            raise InputError(f"K must be in 1..{MAX_SOURCES}, got {k}")
        s = int(self.rng.integers(len(self.layouts)))
        frames, cams = self.layouts[s]
        if self.phase == 1:
            c = int(self.rng.integers(cams))
            src = self.rng.choice(frames, k, replace=False)
            tgt = self._pick(np.setdiff1d(np.arange(frames), src), self.targets)
            return Sample(s, tuple((int(t), c) for t in src), tuple((int(t), c) for t in tgt))
        t = int(self.rng.integers(frames))
        src_cams = self.rng.choice(cams, k, replace=False)
        cross = frames > 1 and bool(self.rng.random() < self.cross_time)
        if cross:
            t2 = int(self._pick(np.setdiff1d(np.arange(frames), [t]), 1)[0])
            tgt = tuple((t2, int(c)) for c in self._pick(np.arange(cams), self.targets))
        else:
            tgt = tuple((t, int(c)) for c in self._pick(np.setdiff1d(np.arange(cams), src_cams), self.targets))
        return Sample(s, tuple((t, int(c)) for c in src_cams), tgt, cross)

    def batch(self, size: int) -> tuple[int, list[Sample]]:
        """One step's samples: K drawn once, then ``size`` samples with that K."""
        k = self.draw_k()
        return k, [self.sample(k) for _ in range(size)]

    def state(self) -> str:
        return json.dumps(self.rng.bit_generator.state)

    def set_state(self, state: str) -> None:
        self.rng.bit_generator.state = json.loads(state)
