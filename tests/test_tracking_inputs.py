"""Tracking inputs: every kind of photo Pillow reads, videos, folders, and bad input with clear messages."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from backend.tracking.images import load_image
from backend.tracking.video import FolderSource, FrameRange, VideoSource, open_sources
from backend.wire.errors import InputError


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


def _save(tmp: Path, name: str, im: Image.Image, **kw) -> Path:  # type: ignore[no-untyped-def]
    p = tmp / name
    im.save(p, **kw)
    return p


def test_every_image_mode_reads_as_rgb8(astronaut: np.ndarray, tmp_path: Path) -> None:
    im = Image.fromarray(astronaut)
    grey = np.asarray(im.convert("L"))
    cases = {
        "grey.png": im.convert("L"),
        "palette.png": im.convert("P", palette=Image.ADAPTIVE, colors=64),
        "bilevel.png": im.convert("1"),
        "cmyk.jpg": im.convert("CMYK"),
        "cmyk.tif": im.convert("CMYK"),
        "rgba.png": im.convert("RGBA"),
        "grey16.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "float.tif": Image.fromarray(grey.astype(np.float32) / 255.0),
        "lab.tif": im.convert("LAB"),
    }
    for name, img in cases.items():
        rgb = load_image(_save(tmp_path, name, img))
        assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8, name
        # The content survives: correlated with the greyscale original.
        g = rgb.astype(np.float64).mean(-1)
        assert np.corrcoef(g.ravel(), grey.ravel().astype(np.float64))[0, 1] > (0.5 if name == "bilevel.png" else 0.9), name
    g16 = load_image(tmp_path / "grey16.png")
    assert np.abs(g16[..., 0].astype(int) - grey).max() <= 1


def test_transparent_pixels_become_white(astronaut: np.ndarray, tmp_path: Path) -> None:
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:100, :100, 3] = 0
    rgb = load_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert (rgb[:100, :100] == 255).all()
    assert (rgb[200:300, 200:300] == astronaut[200:300, 200:300]).all()


def test_exif_orientation_is_applied(astronaut: np.ndarray, tmp_path: Path) -> None:
    # Stored rotated on its side with orientation 6 ("rotate 90 CW to view"): reads upright.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(astronaut, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(tmp_path, "rot.jpg", stored, exif=exif.tobytes(), quality=95)
    rgb = load_image(p)
    assert rgb.shape == astronaut.shape
    assert np.abs(rgb.astype(int) - astronaut.astype(int)).mean() < 8


@pytest.mark.parametrize(
    "content, expect",
    [
        (b"", "not an image"),
        (b"this is not an image at all", "not an image"),
    ],
)
def test_garbage_files_are_refused_by_name(tmp_path: Path, content: bytes, expect: str) -> None:
    p = tmp_path / "photo.jpg"
    p.write_bytes(content)
    with pytest.raises(InputError, match=expect) as err:
        load_image(p)
    assert "photo.jpg" in str(err.value)


def test_truncated_image_is_refused(astronaut: np.ndarray, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(InputError, match="cut.png: damaged or truncated"):
        load_image(p)


def test_tiny_image_is_refused(astronaut: np.ndarray, tmp_path: Path) -> None:
    p = _save(tmp_path, "tiny.png", Image.fromarray(astronaut).resize((40, 40)))
    with pytest.raises(InputError, match=r"tiny.png: image is only 40x40 pixels"):
        load_image(p)


def test_missing_and_unknown_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        open_sources([tmp_path / "nope.jpg"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="neither an image nor a video"):
        open_sources([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="no input given"):
        open_sources([])
    with pytest.raises(InputError, match="--stride must be >= 1"):
        open_sources([tmp_path], FrameRange(stride=0))


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "frames"
    empty.mkdir()
    with pytest.raises(InputError, match="frames: folder has no image files"):
        open_sources([empty])
    (empty / "readme.md").write_text("x")
    with pytest.raises(InputError, match="holds 1 other entries"):
        open_sources([empty])


def test_folder_frames_in_natural_order_with_stride(astronaut: np.ndarray, tmp_path: Path) -> None:
    for i in (1, 2, 10, 11, 3):
        Image.fromarray(astronaut[::4, ::4]).save(tmp_path / f"frame_{i}.png")
    src = FolderSource(tmp_path, FrameRange(stride=2))
    assert [p.name for _, p in src.files] == ["frame_1.png", "frame_3.png", "frame_11.png"]
    assert [f.index for f in src.frames()] == [0, 2, 4]


def test_undecodable_video_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "clip.mp4"
    p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    with pytest.raises(InputError, match="clip.mp4: cannot be opened as a video"):
        open_sources([p])


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_video_stride_and_time_range(astronaut: np.ndarray, tmp_path: Path) -> None:
    small = astronaut[::4, ::4]
    frames = [np.roll(small, 2 * i, axis=1) for i in range(12)]
    p = write_video(tmp_path / "clip.mp4", frames, fps=10)
    all_frames = list(VideoSource(p, FrameRange()).frames())
    assert len(all_frames) == 12 and all_frames[0].rgb.shape == small.shape
    strided = list(VideoSource(p, FrameRange(stride=3)).frames())
    assert [f.index for f in strided] == [0, 3, 6, 9]
    ranged = list(VideoSource(p, FrameRange(start=0.45, end=0.85, stride=2)).frames())
    assert [f.index for f in ranged] == [5, 7]
    assert VideoSource(p, FrameRange(stride=3)).estimate() == 4
    with pytest.raises(InputError, match="selects no frames"):
        list(VideoSource(p, FrameRange(start=5.0)).frames())


def test_unreadable_frames_in_a_folder_are_skipped_unless_all_are(astronaut: np.ndarray, tmp_path: Path) -> None:
    Image.fromarray(astronaut[::4, ::4]).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"broken")
    src = FolderSource(tmp_path, FrameRange())
    assert [f.name for f in src.frames()] == ["a.png"]
    assert len(src.unreadable) == 1 and "b.png" in src.unreadable[0]
    (tmp_path / "a.png").write_bytes(b"broken too")
    with pytest.raises(InputError, match="none of its 2 frames could be read"):
        list(FolderSource(tmp_path, FrameRange()).frames())
