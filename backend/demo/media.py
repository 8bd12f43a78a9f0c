"""Rendered frames -> an animated GIF, an H.264 MP4 and a labelled contact sheet."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from backend.render.animation import contact_sheet


def read_frames(paths: Sequence[Path]) -> list[np.ndarray]:
    """The frames as [H, W, 3] uint8 arrays, in the given order; all must share one size."""
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"the frames differ in size: {sorted({f.shape for f in frames})}")
    return frames


def write_gif(frames: Sequence[np.ndarray], path: Path, fps: int) -> Path:
    """A looping GIF with one shared palette (adaptive, from the first frame), so the set does not flicker."""
    images = [Image.fromarray(f) for f in frames]
    palette = images[0].quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    quantized = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    quantized[0].save(path, save_all=True, append_images=quantized[1:], duration=round(1000 / fps), loop=0, optimize=False)
    return path


def write_mp4(frames: Sequence[np.ndarray], path: Path, fps: int, crf: int = 18) -> Path:
    """H.264 (yuv420p, which every player reads); odd sizes are cropped by one pixel, as 4:2:0 needs even ones."""
    h, w = (d - d % 2 for d in frames[0].shape[:2])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def labelled_sheet(frames: Sequence[np.ndarray], numbers: Sequence[int], path: Path, tiles: int = 12, columns: int = 4) -> Path:
    """Up to ``tiles`` evenly spread frames on a grid, each marked with its frame number."""
    pick = np.unique(np.round(np.linspace(0, len(frames) - 1, min(tiles, len(frames)))).astype(int))
    marked = []
    for i in pick:
        im = Image.fromarray(frames[i])
        ImageDraw.Draw(im).text((4, 2), f"{numbers[i]}", fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        marked.append(np.asarray(im))
    Image.fromarray(contact_sheet(marked, columns=columns, max_tiles=len(marked))).save(path)
    return path
