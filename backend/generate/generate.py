"""Inference: 1 to 4 tracked source views -> an Avatar (the starting point of refinement).

Sources come from a subject folder (chosen frame / camera pairs) or from portrait files,
which are tracked on the fly into a subject folder first (``backend.tracking``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from backend.data.subject import Subject
from backend.gaussians.avatar import Avatar
from backend.gaussians.resample import resample_avatar
from backend.generate.model import MAX_SOURCES, Generator, PoolMode, SourceViews
from backend.generate.outline import OutlineFit, fit_outline, hair_weight, part_weight
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.wire.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_source_count(n: int) -> None:
    """InputError unless 1 <= n <= 4."""
    if n < 1:
        raise InputError(f"no source views: the generator takes 1 to {MAX_SOURCES} portraits (or --frames of a subject)")
    if n > MAX_SOURCES:
        raise InputError(f"{n} source views given: the generator takes 1 to {MAX_SOURCES}; pick at most {MAX_SOURCES}")


def parse_views(specs: Sequence[str] | None, subject: Subject) -> list[tuple[int, int]]:
    """``--frames`` items "T" (camera 0) or "T:C", separated by spaces or commas -> [(frame, camera)].

    Without specs: frame 0 of camera 0.
    """
    if not specs:
        return [(0, 0)]
    views: list[tuple[int, int]] = []
    for spec in specs:
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            try:
                parts = [int(x) for x in item.split(":")]
            except ValueError:
                raise InputError(f"--frames item {item!r} is not FRAME or FRAME:CAMERA (integers)") from None
            if len(parts) not in (1, 2):
                raise InputError(f"--frames item {item!r} is not FRAME or FRAME:CAMERA")
            t, c = parts[0], parts[1] if len(parts) == 2 else 0
            if not 0 <= t < subject.num_frames or not 0 <= c < subject.num_cameras:
                raise InputError(f"--frames {item}: the subject {subject.root} has frames 0..{subject.num_frames - 1} and cameras 0..{subject.num_cameras - 1}")
            views.append((t, c))
    check_source_count(len(views))
    if len(set(views)) != len(views):
        raise InputError(f"--frames names the same view twice: {views}")
    return views


@torch.no_grad()
def subject_sources(subject: Subject, views: Sequence[tuple[int, int]], head: HeadModel) -> SourceViews:
    """SourceViews [1, K, ...] of the chosen views, on the head model's device."""
    check_source_count(len(views))
    device = head.v_template.device
    bg = subject.background()
    images, masks, known = [], [], []
    for t, c in views:
        m = subject.mask(t, c)
        images.append(subject.image(t, c) * m + bg * (1 - m))
        masks.append(m)
        known.append(subject.known(t, c))
    frames = [t for t, _ in views]
    verts = head(subject.params.index(frames).to(device)).vertices
    cams = [c for _, c in views]
    return SourceViews(
        images=torch.stack(images)[None].to(device),
        masks=torch.stack(masks)[None].to(device),
        vertices=verts[None],
        K=subject.K[frames, cams][None].to(device),
        world_to_cam=subject.world_to_cam[frames, cams][None].to(device),
        known=torch.stack(known)[None].to(device),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_avatar(
    model: Generator,
    head: HeadModel,
    subject: Subject,
    views: Sequence[tuple[int, int]],
    pool: PoolMode = "mean",
    meta: dict | None = None,
    outline: OutlineFit = OutlineFit(),
    match_colours: bool = False,
    gaussians: int | None = None,
) -> Avatar:
    """The avatar of ``subject`` generated from ``views``; ``meta["generate_ms"]`` times the network.

    ``model`` and ``head`` must be on the same device. ``outline`` fits the hair volume and
    outline to the sources' person masks after the network (``outline.py``);
    ``match_colours`` evens out the sources' exposure and white balance first
    (``source_gains``). ``gaussians``: carry the result onto a layout of this many
    Gaussians (``resample_avatar``; None keeps the network's own layout).
    """
    if subject.info.head_model != head.name:
        raise InputError(f"subject {subject.root} was tracked with head model '{subject.info.head_model}', the generator uses '{head.name}'")
    sources = subject_sources(subject, views, head)
    model.eval()
    _sync(model.device)
    t0 = time.perf_counter()
    out = model(sources, pool=pool, match_colours=match_colours)
    _sync(model.device)
    ms = (time.perf_counter() - t0) * 1000
    params = subject.params
    static_offset = None if params.static_offset is None else params.static_offset.detach().clone().float()
    local, outline_summary = out.local, {"outline": False}
    if outline.enabled:
        t0 = time.perf_counter()
        neutral = FlameParams.neutral(1, head.n_shape, head.n_expr, device=model.device)
        own = None if static_offset is None else static_offset.to(model.device)
        rest = head(replace(neutral, shape=params.shape.to(model.device), static_offset=own)).vertices
        hair = hair_weight(head.data, model.binding, outline.hairline_ramp)
        seen_as = sources.with_gains(out.gains) if match_colours else sources
        scalp = part_weight(head.data, model.binding, "scalp")
        local, lift, fitted = fit_outline(model, seen_as, local, hair, scalp, rest, outline)
        _sync(model.device)
        if bool(lift.any()):
            static_offset = lift[0].cpu() if static_offset is None else static_offset + lift[0].cpu()
        outline_summary = {"outline": True, **fitted, "outline_ms": round((time.perf_counter() - t0) * 1000, 2)}
    local = local.map(lambda t: t[0].detach().float().cpu().contiguous())
    avatar = Avatar(
        head_name=model.head_name,
        head_fingerprint=model.head_fingerprint,
        shape=params.shape.detach().clone().float(),
        binding=model.binding.to("cpu"),
        local=local,
        static_offset=static_offset,
        meta={
            "init": "generator",
            "sources": [list(v) for v in views],
            "k": len(views),
            "pool": pool,
            "subject": str(subject.root),
            "seen_share": float((out.seen[0] > 0).float().mean()),
            "source_gains": [[round(float(g), 3) for g in gain] for gain in out.gains[0]],
            "generate_ms": round(ms, 2),
            **outline_summary,
            # Refinement takes its reference frame from here.
            "reference_frame": int(views[0][0]),
            "reference_camera": int(views[0][1]),
        }
        | dict(meta or {}),
    )
    return avatar if gaussians is None else resample_avatar(avatar, head, gaussians)


def split_inputs(inputs: Sequence[str | Path]) -> tuple[Path | None, list[Path]]:
    """(subject folder, []) or (None, image files); InputError for anything else."""
    paths = [Path(p) for p in inputs]
    if not paths:
        check_source_count(0)
    subjects = [p for p in paths if p.is_dir()]
    if subjects:
        if len(paths) != 1:
            raise InputError("give either one subject folder (with --frames) or 1 to 4 portrait files, not both")
        if not (subjects[0] / "subject.json").is_file():
            raise InputError(f"{subjects[0]}: not a subject folder (no subject.json); give a subject folder or portrait files")
        return subjects[0], []
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(f"input not found: {missing[0]}")
    odd = [str(p) for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
    if odd:
        raise InputError(f"{odd[0]}: not a portrait image ({', '.join(IMAGE_SUFFIXES)}) or a subject folder")
    check_source_count(len(paths))
    return None, paths


def track_portraits(images: Sequence[Path], out: Path, head: HeadModel) -> Subject:
    """Track 1 to 4 portraits of one person into a subject folder (one frame per portrait)."""
    check_source_count(len(images))
    try:
        from backend.tracking import track
    except ImportError as exc:
        raise InputError(f"portrait files need the tracker (backend.tracking), which is not available here ({exc}); track them into a subject folder first and pass that") from exc
    result = track([str(p) for p in images], out, head)
    subject = Subject.load(result.root)
    if subject.num_frames < 1:
        raise InputError("no face was found in the portraits")
    return subject
