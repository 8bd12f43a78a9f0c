"""The real-face benchmark's own code: its media never enter git, the media copy checks what
it copies, packs carry a subject faithfully, and the face region and held-out picks are right.

The real media are not used here (they never enter CI); a small synthetic subject and a git
repository made in the test stand in for them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.data.regions import hull_mask
from backend.data.subject import LANDMARKS_FILE, Subject
from backend.data.synthetic import SynthConfig, synthesize
from backend.head.model import HeadModel
from backend.refine.evaluate import evaluate
from backend.refine.initialize import InitConfig, initialize_on_subject
from backend.refine.losses import psnr
from tests.benchmarks.real.clips import head_turn_deg, picture_frames
from tests.benchmarks.real.data import PHOTO_SUFFIXES, VIDEO_SUFFIXES, Layout, Sources, clip_stride, prepare
from tests.benchmarks.real.tracking import pack, unpack

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_no_benchmark_media_is_tracked() -> None:
    """No tracked file is a video, and none has the blob id of a listed clip or photo."""
    sources = Sources.load()
    listed = {f.blob for f in sources.all_files()}
    assert len(listed) == len(sources.all_files()) >= 10 + 3 * 5
    tracked = [line.split(maxsplit=3) for line in _git("ls-files", "-s").splitlines()]
    assert tracked, "git ls-files listed nothing"
    videos = [entry[3] for entry in tracked if entry[3].lower().endswith(VIDEO_SUFFIXES)]
    assert videos == []
    media = [entry[3] for entry in tracked if entry[1] in listed]
    assert media == []


def test_sources_cover_the_protocol() -> None:
    """At least 10 clips and 5 photo identities with 3 or more photos each, every repository
    with a commit and a stated licence."""
    sources = Sources.load()
    assert len(sources.clips) >= 10 and len({c.name for c in sources.clips}) == len(sources.clips)
    assert len(sources.photos) >= 5 and all(len(p.files) >= 3 for p in sources.photos)
    assert all(f.path.lower().endswith(PHOTO_SUFFIXES) for p in sources.photos for f in p.files)
    for f in sources.all_files():
        assert len(sources.repos[f.repo]["commit"]) == 40 and sources.repos[f.repo]["licence"]
    # K = 4 leave one out needs five photos: at least five identities have them.
    assert sum(len(p.files) >= 5 for p in sources.photos) >= 5


def test_clips_and_photo_identities_are_chosen_by_name() -> None:
    sources = Sources.load()
    names = [p.name for p in sources.photos]
    assert [p.name for p in sources.select_photos(names[:0])] == names  # none named: all
    assert [p.name for p in sources.select_photos([names[2], names[0]])] == [names[2], names[0]]
    assert [c.name for c in sources.select_clips([sources.clips[1].name])] == [sources.clips[1].name]
    with pytest.raises(SystemExit, match="unknown photo identity name"):
        sources.select_photos(["nobody"])
    with pytest.raises(SystemExit, match="unknown clip name"):
        sources.select_clips([names[0]])


def test_prepare_copies_and_checks_blob_ids(tmp_path: Path) -> None:
    """prepare copies a file out of a repository's history (no work tree needed) with its
    manifest entry, and refuses a file whose blob id differs from the list."""
    from PIL import Image

    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    Image.fromarray(np.full((12, 10, 3), 200, np.uint8)).save(repo / "face.jpg")
    _git("add", "face.jpg", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "add", cwd=repo)
    blob = _git("rev-parse", "HEAD:face.jpg", cwd=repo).strip()
    listed = tmp_path / "sources.json"
    entry = {"repos": {"o/r": {"commit": "", "licence": "MIT (the repository's code)"}}, "clips": [], "photos": [{"name": "p", "repo": "o/r", "files": [{"path": "face.jpg", "blob": blob}]}]}
    listed.write_text(json.dumps(entry))
    layout = Layout(tmp_path / "data")
    manifest = prepare({"o/r": repo}, layout, Sources.load(listed))
    (item,) = manifest["files"]
    assert (item["width"], item["height"], item["blob"], item["media_licence"]) == (10, 12, blob, "not stated")
    assert (layout.media / item["file"]).read_bytes() == (repo / "face.jpg").read_bytes()
    assert item["commit"] == _git("rev-parse", "HEAD", cwd=repo).strip()

    entry["photos"][0]["files"][0]["blob"] = "0" * 40
    listed.write_text(json.dumps(entry))
    with pytest.raises(SystemExit, match="blob"):
        prepare({"o/r": repo}, Layout(tmp_path / "other"), Sources.load(listed))
    with pytest.raises(SystemExit, match="no snapshot"):
        prepare({}, Layout(tmp_path / "other"), Sources.load(listed))


def test_clip_stride_keeps_at_most_the_cap() -> None:
    for frames in (1, 119, 120, 121, 354, 448):
        stride = clip_stride(frames, 120)
        assert math.ceil(frames / stride) <= 120
        assert stride == 1 or math.ceil(frames / (stride - 1)) > 120


def test_hull_mask_is_the_polygon() -> None:
    """A square's hull mask holds exactly the pixel centres inside it; inner points change nothing."""
    square = np.array([[2.0, 3.0], [9.0, 3.0], [9.0, 8.0], [2.0, 8.0]])
    inner = np.array([[4.0, 4.0], [5.0, 6.0]])
    mask = hull_mask(np.concatenate([square, inner]), 12, 14)
    yy, xx = np.mgrid[0:12, 0:14] + 0.5
    assert np.array_equal(mask, (xx >= 2) & (xx <= 9) & (yy >= 3) & (yy <= 8))


@pytest.fixture(scope="module")
def tracked_like(head: HeadModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic monocular subject with a landmarks.npz, as tracking writes one: the face
    region of frame t is the square [8 + t, 40] x [10, 44] pixels."""
    root = synthesize(head, tmp_path_factory.mktemp("real") / "s", SynthConfig(frames=10, size=64, reference_gaussians=20_000, seed=3))
    pts = np.zeros((10, 478, 3), np.float32)
    for t in range(10):
        corners = np.array([[8 + t, 10], [40, 10], [40, 44], [8 + t, 44]], np.float32)
        pts[t, :, :2] = corners[np.arange(478) % 4]
    np.savez(root / LANDMARKS_FILE, mediapipe=pts)
    return root


def test_face_scores_are_taken_inside_the_landmark_hull(head: HeadModel, tracked_like: Path) -> None:
    subject = Subject.load(tracked_like)
    face = subject.face_mask(2)
    assert face is not None and face.shape == (64, 64, 1)
    assert float(face.sum()) == pytest.approx((40 - 10) * (44 - 10))  # pixel centres 10.5 .. 39.5 by 10.5 .. 43.5
    avatar = initialize_on_subject(head, subject, InitConfig(gaussians=3000))
    scores = evaluate(avatar, head, subject, frames=[2])
    from backend.refine.evaluate import render_view

    rendered = render_view(avatar, head, subject.params.index([2]), subject.cameras(2), subject.background())[0]
    m = subject.mask(2)
    target = subject.image(2) * m + subject.background() * (1 - m)
    assert scores["psnr_face"] == pytest.approx(psnr(rendered, target, face), abs=1e-4)
    assert scores["psnr_face"] != pytest.approx(scores["psnr"], abs=1e-3)


def test_evaluate_poses_frames_with_the_given_parameters(head: HeadModel, tracked_like: Path) -> None:
    """Scores under a frame's own parameters equal the default; another frame's differ."""
    subject = Subject.load(tracked_like)
    avatar = initialize_on_subject(head, subject, InitConfig(gaussians=3000))
    own = evaluate(avatar, head, subject, frames=[1, 3])
    same = evaluate(avatar, head, subject, frames=[1, 3], params=subject.params.index([1, 3]))
    other = evaluate(avatar, head, subject, frames=[1, 3], params=subject.params.index([4, 0]))
    assert same["psnr"] == pytest.approx(own["psnr"], abs=1e-6)
    assert other["psnr"] < own["psnr"] - 0.5


def test_pack_round_trip(tracked_like: Path, tmp_path: Path) -> None:
    """Arrays travel byte for byte, masks exactly, frames within JPEG's error; a subject loads."""
    tar = pack(tracked_like, tmp_path / "s.tar", quality=90)
    out = unpack(tar, tmp_path / "unpacked")
    a, b = Subject.load(tracked_like), Subject.load(out)
    for name in ("flame_param.npz", "cameras.npz", LANDMARKS_FILE, "subject.json"):
        assert (out / name).read_bytes() == (tracked_like / name).read_bytes()
    for t in range(a.num_frames):
        assert torch.equal(a.mask(t), b.mask(t))
        assert psnr(a.image(t), b.image(t)) > 30.0


def test_head_turn_and_picture_frames(head: HeadModel, tracked_like: Path) -> None:
    """A head yawed by 30 degrees in front of a camera looking at it is turned 30 degrees; the
    pictures take the most turned held-out frame."""
    params = head.neutral_params(2)
    params.rotation[1, 1] = math.radians(30.0)
    facing = torch.eye(4).expand(2, 4, 4).clone()
    facing[:, 0, 0] = facing[:, 2, 2] = -1.0  # camera on +z looking back at the face
    assert np.allclose(head_turn_deg(params, facing), [0.0, 30.0], atol=1e-3)

    subject = Subject.load(tracked_like)
    test = subject.split["test"]
    turns = head_turn_deg(subject.params.index(test), subject.world_to_cam[test, 0])
    frames = picture_frames(subject)
    assert frames[-1] == test[int(turns.argmax())] and len(set(frames)) == len(frames) and set(frames) <= set(test)


def test_a_subject_that_was_never_tracked_is_named_in_one_line(tmp_path: Path) -> None:
    from tests.benchmarks.real.clips import open_subject

    with pytest.raises(SystemExit, match="no subject 'nosuch'.*track and pack it first"):
        open_subject("nosuch", Layout(tmp_path))


def test_a_lever_changes_only_its_fields_of_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lever's nested changes merge into their group; everything else stays ours."""
    from dataclasses import replace

    from backend.refine.config import preset
    from tests.benchmarks.real.clips import refine_config
    from tests.benchmarks.real.protocol import LEVERS, Lever, Protocol, lever_of, method_choices, starts_from_generator

    protocol = Protocol()
    ours = refine_config("ours-surface", protocol)
    assert ours == preset("ours", iterations=protocol.iterations, log_every=protocol.iterations // 10, checkpoint_every=0)
    plain = refine_config("ours-surface+no-real-tuning", protocol)
    assert plain.real_tuning is None and ours.real_tuning is not None
    assert replace(plain, real_tuning=ours.real_tuning) == ours
    tuned = refine_config("ours-surface+flame-ft", protocol)
    assert tuned.finetune_flame and replace(tuned, finetune_flame=False) == ours
    monkeypatch.setitem(LEVERS, "looser", Lever("scale threshold 1.0", {"anti_spike": {"max_scale": 1.0}}))
    looser = refine_config("ours-surface+looser", protocol)
    assert looser.anti_spike.max_scale == 1.0 and replace(looser.anti_spike, max_scale=ours.anti_spike.max_scale) == ours.anti_spike
    from tests.benchmarks.real.clips import init_config

    assert init_config("ours-surface", protocol) == InitConfig(gaussians=protocol.gaussians)
    sh1 = init_config("ours-surface+sh1", protocol)
    assert sh1.surface.sh_degree == 1 and replace(sh1.surface, sh_degree=0) == InitConfig().surface and sh1.gaussians == protocol.gaussians
    assert init_config("ours-surface+200k", protocol).gaussians == 200_000
    room = refine_config("ours-surface+hair-room", protocol)
    assert room.real_tuning is not None and (room.real_tuning.threshold_factor, room.real_tuning.lr_factor) == (5.0, 2.0)
    assert lever_of("densify") is None and all(f"ours-surface+{n}" in method_choices() for n in LEVERS)
    # A lever from the generator: the same refinement as from the surface, another start.
    assert all(f"ours-generator+{n}" in method_choices() for n in LEVERS)
    assert refine_config("ours-generator+photo-lr3+tuned", protocol) == refine_config("ours-surface+photo-lr3+tuned", protocol)
    assert starts_from_generator("ours-generator+photo-lr3+tuned") and not starts_from_generator("ours-surface+photo-lr3+tuned")
    third = refine_config("ours-generator+photo-lr3+tuned-third", protocol)
    assert third.iterations == 3_334 and replace(third, iterations=protocol.iterations) == refine_config("ours-surface+photo-lr3+tuned", protocol)
    with pytest.raises(SystemExit, match="unknown lever"):
        lever_of("ours-surface+nosuch")


def test_lever_table_compares_each_lever_with_its_base() -> None:
    from tests.benchmarks.real.report import lever_table

    def scores(mask: float) -> dict:
        return {"psnr": mask + 3, "psnr_mask": mask, "psnr_face": mask + 6, "ssim_mask": 0.8, "train_psnr": mask + 4, "spike_share": 0.1, "wall_seconds": 20.0}

    results = {
        "a": {"methods": {"ours-surface": scores(20.0), "ours-surface+photo-lr3+tuned": scores(23.0), "ours-generator+photo-lr3+tuned": scores(24.5)}},
        "b": {"methods": {"ours-surface": scores(22.0), "ours-surface+photo-lr3+tuned": scores(24.0)}},
    }
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lever_table(results) if line.startswith("| ") and "---" not in line}
    surface, generator = rows["photo-lr3+tuned"], rows["from the generator: photo-lr3+tuned"]
    assert surface[2:5] == ["ours-surface", "a, b", "2.50"]  # base, clips, d psnr: (3 + 2) / 2
    assert generator[2:5] == ["ours-surface+photo-lr3+tuned", "a", "1.50"]  # only clip a ran both


def test_another_generator_needs_a_file_and_a_plain_tag_so_it_cannot_overwrite_the_shipped_ones_results(tmp_path: Path) -> None:
    bench = [sys.executable, str(ROOT / "tests" / "benchmarks" / "bench_real.py"), "--data", str(tmp_path), "clips", "--methods", "generator"]
    weights = tmp_path / "g.pt"
    refusals = {
        "--generator and --tag go together": (["--generator", str(weights)], ["--tag", "ft"]),
        "no such file": (["--generator", str(weights), "--tag", "ft"],),
        "letters, digits": (["--generator", str(ROOT / "backend" / "generate" / "weights" / "generator.pt"), "--tag", "a/b"],),
    }
    for message, cases in refusals.items():
        for extra in cases:
            run = subprocess.run(bench + extra, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert run.returncode != 0 and message in run.stderr, (extra, run.stderr[-300:])
    assert not any(tmp_path.iterdir())  # nothing written


def test_generator_regions_split_the_person_mask_into_four_parts(head: HeadModel, tracked_like: Path, tmp_path: Path) -> None:
    from tests.benchmarks.generator_regions import parse_args, part_errors

    subject = Subject.load(tracked_like)
    avatar = initialize_on_subject(head, subject, InitConfig(gaussians=3000))
    parts = part_errors(avatar, head, subject)
    frames = subject.split["test"]
    person = sum(int((subject.mask(t) > 0.5).sum()) for t in frames)
    face = sum(int(((subject.mask(t) > 0.5) & (subject.face_mask(t) > 0.5)).sum()) for t in frames)
    assert sum(count for _, count in parts.values()) == person and parts["face"][1] == face
    assert all(err >= 0.0 for err, _ in parts.values()) and parts["above"][1] > 0

    weights = tmp_path / "generator.pt"
    weights.write_bytes(b"")
    args, generators = parse_args(["--clips", "lp_d3", "--generator", f"mine={weights}"])
    assert generators == {"shipped": None, "mine": str(weights)} and args.clips == ["lp_d3"]
    for bad in ("mine", f"mine={tmp_path / 'missing.pt'}", f"shipped={weights}", f"={weights}"):
        with pytest.raises(SystemExit):
            parse_args(["--clips", "lp_d3", "--generator", bad])


def test_faint_sweep_reads_rules_and_refuses_bad_ones() -> None:
    from backend.refine.config import FaintColours
    from tests.benchmarks.real.faint_sweep import parse_rule, rule_label

    assert parse_rule("off") is None
    rule = parse_rule("min_known_share=0.5,min_known_px=0.1")
    assert rule == {"min_known_share": 0.5, "min_known_px": 0.1, "min_facing": 0.0}
    FaintColours(**rule)  # the names are the config's own
    assert rule_label("min_known_share=0.5,min_known_px=0.1") == "known_share0.5_known_px0.1"
    for bad in ("enabled=1", "min_known_px", "min_known_px=", "min_known_px=abc", "share=0.5"):
        with pytest.raises(SystemExit):
            parse_rule(bad)
