"""Uploads of track jobs over the wire: videos probed before a job is accepted, uploads
removed once no run of their job can read them, a crash's half-written checkpoints removed at
start-up, and failure messages that do not tell where the store lies."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
from PIL import Image

from backend.server.config import RequestLimits
from backend.server.service import Service
from backend.wire.client import Client
from backend.wire.protocol import ErrorCode, WireError
from tests.test_server_support import service_thread

# Small enough that the test videos below can break each limit.
LIMITS = RequestLimits(max_video_frames=8, max_video_seconds=5.0, max_video_side=160)


def video(folder: Path, frames: int = 3, width: int = 96, height: int = 80, fps: int = 10, faststart: bool = False) -> np.ndarray:
    """An MP4 of random noise (no face in it) as the [n] uint8 buffer ``track`` takes."""
    path = folder / f"noise-{frames}-{width}x{height}-{fps}-{faststart}.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(noise, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return np.fromfile(path, np.uint8)


def audio_only(folder: Path) -> np.ndarray:
    """An MP4 holding one second of silence and no video stream."""
    path = folder / "silence.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000, layout="mono")
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return np.fromfile(path, np.uint8)


def png(rgb: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def first_half(data: np.ndarray) -> np.ndarray:
    return data[: data.size // 2]


def uploads(service: Service) -> set[str]:
    return {p.name for p in service.store.inputs_dir.iterdir()}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Client]]:
    with service_thread(tmp_path_factory.mktemp("store"), requests=LIMITS) as service, Client(service.endpoint, timeout_s=120) as client:
        yield service, client


@pytest.fixture(scope="module")
def failed_track(served, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final record of a track job whose video is readable but holds no face."""
    _, client = served
    job = client.call("track", {}, {"video": video(tmp_path_factory.mktemp("video"))}).result["job"]
    final = client.call("watch", {"job": job["id"]}).result["job"]
    assert final["state"] == "failed" and "no face" in final["error"]["message"], final
    return final


def test_a_failed_track_job_leaves_no_upload(served, failed_track: dict) -> None:
    service, _ = served
    assert not failed_track["resumable"]
    assert failed_track["result"]["subject"] not in uploads(service)


def test_a_failed_job_does_not_tell_where_the_store_is(served, failed_track: dict) -> None:
    service, _ = served
    for text in (failed_track["message"], failed_track["error"]["message"]):
        assert str(service.store.root) not in text
        assert "input0.mp4" in text  # the upload is still named, relative to the store


def test_a_tracked_job_s_warnings_do_not_tell_where_the_store_is(served) -> None:
    service, client = served
    photos = {"image0": png(skimage.data.astronaut()), "image1": png(np.stack([skimage.data.coins()] * 3, -1))}
    final = client.call("watch", {"job": client.call("track", {"size": 64}, photos).result["job"]["id"]}).result["job"]
    assert final["state"] == "done", final
    (warning,) = final["result"]["warnings"]
    assert "input1.png: no face found" in warning and str(service.store.root) not in warning
    assert final["result"]["subject"] not in uploads(service)


@pytest.mark.parametrize(
    "make, code, words",
    [
        (lambda d: first_half(video(d)), ErrorCode.INVALID_ARGUMENT, "cannot be read as a video"),  # its index was at the end
        (lambda d: first_half(video(d, frames=6, faststart=True)), ErrorCode.INVALID_ARGUMENT, "is truncated"),
        (lambda d: np.frombuffer(b"\0\0\0\x18ftypisom" + bytes(4000), np.uint8), ErrorCode.INVALID_ARGUMENT, "cannot be read"),
        (audio_only, ErrorCode.INVALID_ARGUMENT, "has no video stream"),
        (lambda d: video(d, width=48, height=48), ErrorCode.INVALID_ARGUMENT, "48x48 pixels"),
        (lambda d: video(d, width=192), ErrorCode.TOO_LARGE, "at most 160"),
        (lambda d: video(d, frames=9), ErrorCode.TOO_LARGE, "more than 8 frames"),
        (lambda d: video(d, frames=6, fps=1), ErrorCode.TOO_LARGE, "at most 5 s"),
    ],
    ids=["cut-in-half", "frames-missing", "not-a-video", "audio-only", "too-small", "too-wide", "too-many-frames", "too-long"],
)
def test_a_bad_video_is_refused_at_submission(served, tmp_path: Path, make, code: ErrorCode, words: str) -> None:
    service, client = served
    jobs, kept = len(client.call("list", {"kind": "jobs"}).result["jobs"]), uploads(service)
    with pytest.raises(WireError) as err:
        client.call("track", {}, {"video": make(tmp_path)})
    assert err.value.code == code and words in str(err.value) and "'video'" in str(err.value), err.value
    assert len(client.call("list", {"kind": "jobs"}).result["jobs"]) == jobs and uploads(service) == kept


def test_deleting_an_interrupted_job_removes_its_uploads(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with service_thread(store) as first, Client(first.endpoint, timeout_s=60) as client:
        # A long job keeps the worker busy, so the track job is still queued when the service stops.
        client.call("synthesize", {"frames": 600, "size": 128, "reference_gaussians": 20_000})
        job = client.call("track", {}, {"video": video(tmp_path)}).result["job"]
        subject = job["result"]["subject"]
        assert subject in uploads(first)
    with service_thread(store) as second, Client(second.endpoint, timeout_s=60) as client:
        record = client.call("get", {"id": job["id"]}).result["job"]
        assert record["state"] == "interrupted" and record["resumable"]
        assert subject in uploads(second)  # a resumed run reads them
        partial = second.store.jobs_dir / f"{job['id']}.ckpt.partial"
        partial.touch()  # what a checkpoint write that raised leaves behind
        client.call("delete", {"id": job["id"]})
        assert subject not in uploads(second) and not partial.exists()


def test_a_crash_s_leftovers_are_gone_once_the_service_starts(tmp_path: Path) -> None:
    store = tmp_path / "store"
    partial = store / "jobs" / "jb_0123456789abcdef.ckpt.partial"  # a kill during a checkpoint write
    orphan = store / "inputs" / "sb_0123456789abcdef" / "input0.mp4"  # uploads of no job
    for path in (partial, orphan):
        path.parent.mkdir(parents=True)
        path.touch()
    with service_thread(store) as service:
        assert not partial.exists() and uploads(service) == set()


def test_a_service_without_pyav_refuses_a_video_and_goes_on(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyAV is imported only for a video upload. Here it is installed, so its absence is
    simulated: a None entry in sys.modules makes ``import av`` fail as on a machine without it."""
    service, client = served
    upload = video(tmp_path)
    jobs = len(client.call("list", {"kind": "jobs"}).result["jobs"])
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(WireError) as err:
        client.call("track", {}, {"video": upload})
    assert err.value.code == ErrorCode.NOT_AVAILABLE and "PyAV is not installed" in str(err.value)
    assert client.call("hello").result["protocol"] and len(client.call("list", {"kind": "jobs"}).result["jobs"]) == jobs
