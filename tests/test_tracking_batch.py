"""Batch tracking: many clips into one subject each, by real worker processes, on real
tracking (mediapipe and the fit) of short clips made from the astronaut portrait."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from backend.cli import main as cli_main
from backend.data.subject import Subject
from backend.tracking.batch import PARTIAL, BatchConfig, find_clips, track_batch
from backend.tracking.crop import CropConfig
from backend.tracking.fit import FitConfig
from backend.tracking.track import TrackConfig
from tests.test_tracking_inputs import write_video

QUICK = TrackConfig(crop=CropConfig(size=96), fit=FitConfig(rigid_steps=20, full_steps=30), previews=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of clips: a video, a folder of frames, a file that is no video and a clip
    without a face."""
    root = tmp_path_factory.mktemp("corpus")
    face = np.ascontiguousarray(skimage.data.astronaut()[20:276, 90:346])
    write_video(root / "talk.mp4", [np.ascontiguousarray(np.roll(face, 2 * i, axis=1)) for i in range(4)])
    (root / "stills").mkdir()
    for i in range(3):
        Image.fromarray(np.ascontiguousarray(np.roll(face, 3 * i, axis=0))).save(root / "stills" / f"f{i}.png")
    (root / "broken.mp4").write_bytes(b"not a video at all")
    write_video(root / "empty_room.mp4", [np.full((256, 256, 3), 128, np.uint8)] * 3)
    (root / "notes.txt").write_text("ignored: neither a video nor a folder of frames")
    return root


def test_every_clip_becomes_a_subject_and_failures_are_reported(corpus: Path, tmp_path: Path) -> None:
    clips = find_clips([corpus])
    assert [c.name for c in clips] == ["broken.mp4", "empty_room.mp4", "stills", "talk.mp4"]
    lines: list[str] = []
    out = tmp_path / "subjects"
    result = track_batch(clips, out, "builtin", BatchConfig(workers=2, track=QUICK), progress=lines.append)
    assert sorted(result.tracked) == ["stills", "talk"] and not result.skipped
    assert sorted(result.failed) == ["broken", "empty_room"]
    assert all("\n" not in reason and reason for reason in result.failed.values())
    assert Subject.load(out / "talk").num_frames == 4 and Subject.load(out / "stills").num_frames == 3
    # Failed clips leave nothing behind, not even their partial folders.
    assert sorted(p.name for p in out.iterdir()) == ["stills", "talk"]
    assert len(lines) == 4 and any("broken: failed" in line for line in lines)

    again = track_batch(clips, out, "builtin", BatchConfig(workers=2, track=QUICK))
    assert sorted(again.skipped) == ["stills", "talk"] and not again.tracked and sorted(again.failed) == ["broken", "empty_room"]


def test_a_stale_partial_folder_is_replaced(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "subjects"
    (out / ("talk" + PARTIAL) / "images").mkdir(parents=True)
    (out / ("talk" + PARTIAL) / "images" / "00099_00.png").write_bytes(b"left from an interrupted run")
    result = track_batch([corpus / "talk.mp4"], out, "builtin", BatchConfig(workers=1, track=QUICK))
    assert list(result.tracked) == ["talk"] and not (out / ("talk" + PARTIAL)).exists()
    assert sorted(p.name for p in (out / "talk" / "images").iterdir()) == [f"{i:05d}_00.png" for i in range(4)]


def test_the_command_and_its_errors(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "subjects"
    (out / "talk").mkdir(parents=True)
    (out / "talk" / "subject.json").write_text("{}")  # tracked before: skipped, not read
    code = cli_main(["track-batch", str(corpus / "talk.mp4"), str(corpus / "stills"), "--out", str(out), "--size", "96", "--workers", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["tracked"] == 1 and summary["skipped"] == 1 and summary["failed"] == {}
    assert Subject.load(out / "stills").info.width == 96

    (tmp_path / "other").mkdir()
    write_video(tmp_path / "other" / "stills.mp4", [np.zeros((64, 64, 3), np.uint8)] * 2)
    code = cli_main(["track-batch", str(corpus / "stills"), str(tmp_path / "other"), "--out", str(out)])
    assert code == 2 and "two clips would share a subject folder: stills" in capsys.readouterr().err
    code = cli_main(["track-batch", str(corpus / "notes.txt"), "--out", str(out)])
    assert code == 2 and "not a video" in capsys.readouterr().err
    code = cli_main(["track-batch", str(corpus), "--out", str(out), "--workers", "0"])
    assert code == 2 and "--workers must be at least 1" in capsys.readouterr().err
