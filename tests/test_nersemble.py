"""NeRSemble sequences into subjects (backend/tracking/nersemble.py).

Every test writes a NeRSemble-layout folder from a synthetic multi-view subject, whose
cameras and FLAME parameters are known, in the capture's own conventions (another world,
another scale, OpenGL or OpenCV camera axes, full-resolution intrinsics), converts it back
and checks that the same 3D points land on the same pixels. The last test converts a real
sequence when one has been put into the ignored folder data/nersemble/ (none ships: the
dataset is released on request only) and is skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from backend.cli import main
from backend.data.subject import Subject
from backend.data.synthetic import SynthConfig, synthesize
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.render.camera import project
from backend.tracking.crop import crop_image, to_crop
from backend.tracking.nersemble import HELDOUT, VHAP_TEETH, NersembleConfig, convert_nersemble
from backend.wire.errors import InputError

REAL_SAMPLES = Path(__file__).resolve().parents[1] / "data" / "nersemble"
SERIALS = ["222200036", "222200037", "222200038"]
SIZE = 96


@pytest.fixture(scope="module")
def synth(head: HeadModel, tmp_path_factory: pytest.TempPathFactory) -> Subject:
    """Three cameras on an arc, five frames of a moving face, rendered with the built-in head."""
    root = synthesize(
        head, tmp_path_factory.mktemp("nersemble") / "synth", SynthConfig(frames=5, views=3, size=SIZE, reference_gaussians=10_000, seed=3)
    )
    return Subject.load(root)


def rigid(seed: int) -> np.ndarray:
    """A capture world: some rotation and shift away from FLAME's."""
    g = np.eye(4)
    g[:3, :3] = Rotation.from_rotvec(np.random.default_rng(seed).normal(size=3) * 0.8).as_matrix()
    g[:3, 3] = [0.3, -1.2, 0.7]
    return g


def root_joints(head: HeadModel, params: FlameParams) -> np.ndarray:
    """[T, 3] FLAME's root joint (where its global rotation turns the head), before translation."""
    with torch.no_grad():
        return head(replace(params, translation=torch.zeros_like(params.translation))).joints[:, 0].double().numpy()


def padded(a: torch.Tensor, n: int) -> list:
    """[T, k] -> [T, n] lists: a tracker with more components than the head uses."""
    return torch.nn.functional.pad(a, (0, n - a.shape[-1])).tolist()


def write_export(
    subject: Subject, folder: Path, head: HeadModel, g: np.ndarray, params: FlameParams | None = None, shape: np.ndarray | None = None
) -> None:
    """A GaussianAvatars / VHAP export: transforms.json (camera-to-world, OpenGL axes), PNG frames
    and one VHAP flame_param file per timestep, all in the world ``g`` (rigid) of FLAME's."""
    p = params or subject.params
    for sub in ("images", "fg_masks", "flame_param"):
        (folder / sub).mkdir(parents=True)
    gR, gt = g[:3, :3], g[:3, 3]
    R = gR @ Rotation.from_rotvec(p.rotation.double().numpy()).as_matrix()
    J0 = root_joints(head, p)
    # VHAP's head: x = R (v - J0) + J0 + T, so T = g(J0 + T_ours) - J0.
    T = (J0 + p.translation.double().numpy()) @ gR.T + gt - J0
    frames = []
    for t in range(subject.num_frames):
        arrays = {
            "shape": np.pad(p.shape.numpy(), (0, 300 - p.shape.numel())) if shape is None else shape,
            "expr": np.asarray(padded(p.expr[t : t + 1], 100)),
            "rotation": Rotation.from_matrix(R[t]).as_rotvec()[None],
            "translation": T[t][None],
            "neck_pose": p.neck_pose[t : t + 1].numpy(),
            "jaw_pose": p.jaw_pose[t : t + 1].numpy(),
            "eyes_pose": p.eyes_pose[t : t + 1].numpy(),
        }
        if p.static_offset is not None:
            teeth = np.full((VHAP_TEETH, 3), 0.5)  # VHAP's FLAME appends teeth; their offsets must be dropped
            arrays["static_offset"] = np.concatenate([p.static_offset.numpy(), teeth])[None]
        np.savez(folder / "flame_param" / f"{t:05d}.npz", **arrays)
        for c, serial in enumerate(SERIALS):
            w2c = subject.world_to_cam[t, c].double().numpy() @ np.linalg.inv(g)
            c2w = np.linalg.inv(w2c)
            c2w[:3, 1:3] *= -1.0  # OpenCV -> OpenGL camera axes
            K = subject.K[t, c].double().numpy()
            name = f"{t:05d}_{c:02d}.png"
            shutil.copy(subject.root / "images" / name, folder / "images" / name)
            shutil.copy(subject.root / "masks" / name, folder / "fg_masks" / name)
            frames.append(
                {
                    "timestep_index": t,
                    "camera_index": c,
                    "camera_id": serial,
                    "fl_x": K[0, 0],
                    "fl_y": K[1, 1],
                    "cx": K[0, 2],
                    "cy": K[1, 2],
                    "w": SIZE,
                    "h": SIZE,
                    "transform_matrix": c2w.tolist(),
                    "file_path": f"images/{name}",
                    "fg_mask_path": f"fg_masks/{name}",
                    "flame_param_path": f"flame_param/{t:05d}.npz",
                }
            )
    (folder / "transforms.json").write_text(json.dumps({"frames": frames}))


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as box:
        stream = box.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv444p"
        stream.options = {"crf": "0"}
        for f in frames:
            box.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        box.mux(stream.encode())


def write_release(subject: Subject, participant: Path, head: HeadModel, g: np.ndarray, scale: float) -> Path:
    """The NeRSemble benchmark's layout: per-camera videos and alpha videos, the participant's
    camera_params.json (OpenCV, intrinsics of frames twice as large) and a FLAME tracking whose
    head is ``scale`` times FLAME's size, x = scale * R v + t, in the world ``scale * g``."""
    p = subject.params
    seq = participant / "sequences" / "EXP-1-head"
    gR, gt = g[:3, :3], g[:3, 3]
    r_ours = Rotation.from_rotvec(p.rotation.double().numpy()).as_matrix()
    R = gR @ r_ours
    J0 = root_joints(head, p)
    t_cap = scale * ((J0 - np.einsum("tij,tj->ti", r_ours, J0) + p.translation.double().numpy()) @ gR.T + gt)
    (seq / "tracking").mkdir(parents=True)
    np.savez(
        seq / "tracking" / "flame2023_tracking.npz",
        shape=np.pad(p.shape.numpy(), (0, 300 - p.shape.numel()))[None],
        expression=np.asarray(padded(p.expr, 100)),
        rotation=Rotation.from_matrix(R).as_euler("XYZ"),
        rotation_matrices=R,
        translation=t_cap,
        jaw=p.jaw_pose.numpy(),
        neck=p.neck_pose.numpy(),
        eyes=p.eyes_pose.numpy(),
        scale=np.array([[scale]]),
        frames=np.arange(subject.num_frames),
    )
    calib: dict = {"world_2_cam": {}}
    for c, serial in enumerate(SERIALS):
        Rc, tc = subject.world_to_cam[0, c, :3, :3].double().numpy(), subject.world_to_cam[0, c, :3, 3].double().numpy()
        w2c = np.eye(4)
        w2c[:3, :3] = Rc @ gR.T
        w2c[:3, 3] = scale * (tc - Rc @ gR.T @ gt)
        calib["world_2_cam"][serial] = w2c.tolist()
        rgb = [(subject.image(t, c).numpy() * 255 + 0.5).astype(np.uint8) for t in range(subject.num_frames)]
        alpha = [np.repeat((subject.mask(t, c).numpy() * 255 + 0.5).astype(np.uint8), 3, axis=2) for t in range(subject.num_frames)]
        write_video(seq / "images" / f"cam_{serial}.mp4", rgb)
        write_video(seq / "alpha_maps" / f"cam_{serial}.mp4", alpha)
    K = subject.K[0, 0].double().numpy()
    K_full = K * np.array([[2], [2], [1]])
    K_full[:2, 2] -= 0.5  # OpenCV: pixel (0, 0)'s centre at (0, 0)
    calib["intrinsics"] = K_full.tolist()
    (participant / "calibration").mkdir(parents=True)
    (participant / "calibration" / "camera_params.json").write_text(json.dumps(calib))
    return seq


def pixels(head: HeadModel, subject: Subject) -> np.ndarray:
    """[T, C, V, 2] where each subject's posed head lands in each of its cameras."""
    with torch.no_grad():
        verts = head(subject.params).vertices
    return np.stack([project(verts[t], subject.cameras(t))[0].double().numpy() for t in range(subject.num_frames)])


def original_in_crops(head: HeadModel, original: Subject, converted: Subject, cameras: list[int]) -> np.ndarray:
    """The original's projections of ``cameras``, carried into the converted subject's crops."""
    uv = pixels(head, original)[:, cameras]
    crops = converted.info.extra["nersemble"]["crops"]
    return np.stack(
        [
            [to_crop(uv[t, j], crops[converted.info.extra["nersemble"]["cameras"][j]][t], SIZE) for j in range(len(cameras))]
            for t in range(len(uv))
        ]
    )


def test_export_round_trip(head: HeadModel, synth: Subject, tmp_path: Path) -> None:
    write_export(synth, tmp_path / "seq", head, rigid(1))
    result = convert_nersemble(tmp_path / "seq", tmp_path / "out", head, NersembleConfig(size=SIZE))
    s = Subject.load(tmp_path / "out")
    assert (s.num_frames, s.num_cameras, s.info.width) == (5, 3, SIZE)
    assert s.split == {"train": [0, 1, 2, 3], "test": [4]} and result.cameras == SERIALS
    # The capture's world is undone: FLAME parameters and cameras come back as they were.
    for name in ("expr", "neck_pose", "jaw_pose", "eyes_pose", "shape"):
        np.testing.assert_allclose(getattr(s.params, name).numpy(), getattr(synth.params, name).numpy(), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(s.params.rotation.numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(s.params.translation.numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(pixels(head, s), original_in_crops(head, synth, s, [0, 1, 2]), atol=2e-3)
    # Images and masks are the original frames, cut where the cameras say.
    with torch.no_grad():
        lmk = head(s.params).landmarks
    for t in range(5):
        for c in range(3):
            box = s.info.extra["nersemble"]["crops"][SERIALS[c]][t]
            expect, _ = crop_image((synth.image(t, c).numpy() * 255 + 0.5).astype(np.uint8), np.array(box), SIZE)
            assert np.abs(s.image(t, c).numpy() * 255 - expect).mean() < 1.0
            uv = project(lmk[t], s.cameras(t))[0][c].long().clamp(0, SIZE - 1)
            assert s.mask(t, c)[uv[:, 1], uv[:, 0]].mean() > 0.95  # the face is foreground where it projects


def test_release_round_trip_with_scale_subset_and_held_out_camera(head: HeadModel, synth: Subject, tmp_path: Path) -> None:
    seq = write_release(synth, tmp_path / "017", head, rigid(2), scale=1.7)
    config = NersembleConfig(size=SIZE, cameras=(SERIALS[2], SERIALS[0]), test_cameras=(SERIALS[1],), stride=2)
    result = convert_nersemble(seq, tmp_path / "out", head, config)
    s, held = Subject.load(tmp_path / "out"), Subject.load(tmp_path / "out" / HELDOUT)
    assert result.cameras == [SERIALS[2], SERIALS[0]] and result.heldout == [SERIALS[1]]
    assert (s.num_frames, s.num_cameras, held.num_cameras) == (3, 2, 1) and s.split == held.split == {"train": [0, 1], "test": [2]}
    kept = synth.params.index([0, 2, 4])
    np.testing.assert_allclose(s.params.expr.numpy(), kept.expr.numpy(), atol=1e-6)
    np.testing.assert_allclose(s.params.rotation.numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(s.params.translation.numpy(), 0.0, atol=1e-5)  # 1.7x the head, 1.7x the world: undone
    original = Subject(synth.root, replace(synth.info, num_frames=3), kept, synth.K[[0, 2, 4]], synth.world_to_cam[[0, 2, 4]])
    np.testing.assert_allclose(pixels(head, s), original_in_crops(head, original, s, [2, 0]), atol=2e-3)
    np.testing.assert_allclose(pixels(head, held), original_in_crops(head, original, held, [1]), atol=2e-3)
    expect, _ = crop_image(
        (synth.image(4, 1).numpy() * 255 + 0.5).astype(np.uint8), np.array(held.info.extra["nersemble"]["crops"][SERIALS[1]][2]), SIZE
    )
    assert np.abs(held.image(2, 0).numpy() * 255 - expect).mean() < 2.0  # the video is lossless but for colour conversion


def test_moving_head_extra_components_and_teeth(head: HeadModel, synth: Subject, tmp_path: Path) -> None:
    """Head rotation and translation, identity beyond the head's 100 components, VHAP's teeth rows:
    the converted head is the tracked one in a world turned so that it faces +z on average."""
    gen = torch.Generator().manual_seed(5)
    p = replace(synth.params.detach_clone(), static_offset=torch.randn(head.num_vertices, 3, generator=gen) * 1e-3)
    p.rotation = torch.randn(5, 3, generator=gen) * 0.3
    p.translation = torch.randn(5, 3, generator=gen) * 0.05
    full = replace(head.data, n_shape=300, n_expr=100)  # the tracker's model: every component
    tracker = HeadModel(full)
    shape = np.concatenate([p.shape.numpy(), np.random.default_rng(6).normal(size=200)])
    truth = replace(p, shape=torch.from_numpy(shape).float(), expr=torch.nn.functional.pad(p.expr, (0, 50)))
    write_export(synth, tmp_path / "seq", tracker, rigid(3), truth, shape=shape)
    result = convert_nersemble(tmp_path / "seq", tmp_path / "out", head, NersembleConfig(size=SIZE))
    s = Subject.load(tmp_path / "out")
    assert any("folded into static_offset" in n for n in result.notes)
    with torch.no_grad():
        want, got = tracker(truth).vertices.double().numpy(), head(s.params).vertices.double().numpy()
    # One rigid motion maps the tracked head onto the converted one in every frame (Kabsch).
    a, b = want.reshape(-1, 3), got.reshape(-1, 3)
    u, _, vt = np.linalg.svd((a - a.mean(0)).T @ (b - b.mean(0)))
    turn = (u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt).T
    assert np.abs((a - a.mean(0)) @ turn.T + b.mean(0) - b).max() < 2e-5
    mean_turn = Rotation.from_rotvec(s.params.rotation.numpy()).mean().magnitude()
    assert mean_turn < 1e-4 and np.abs(s.params.translation.numpy().mean(0)).max() < 1e-6
    original = Subject(synth.root, synth.info, tracker_params_on(head, truth), synth.K, synth.world_to_cam)
    np.testing.assert_allclose(pixels(head, s), original_in_crops(head, original, s, [0, 1, 2]), atol=2e-3)


def tracker_params_on(head: HeadModel, p: FlameParams) -> FlameParams:
    """``p`` (300 identity components) on ``head``: the components past its own as a template offset."""
    dirs = head.data.shapedirs[:, :, head.n_shape : 300]
    offset = torch.from_numpy(np.einsum("vik,k->vi", dirs, p.shape[head.n_shape :].double().numpy())).float()
    return replace(p, shape=p.shape[: head.n_shape], expr=p.expr[:, : head.n_expr], static_offset=p.static_offset + offset)


def test_unused_expression_components_are_reported(head: HeadModel, synth: Subject, tmp_path: Path) -> None:
    truth = replace(synth.params.detach_clone(), expr=torch.nn.functional.pad(synth.params.expr, (0, 50), value=0.5))
    write_export(synth, tmp_path / "seq", HeadModel(replace(head.data, n_expr=100)), rigid(4), truth)
    result = convert_nersemble(tmp_path / "seq", tmp_path / "out", head, NersembleConfig(size=SIZE, max_frames=2, test_fraction=0.0))
    s = Subject.load(tmp_path / "out")
    assert s.split == {"train": [0, 1], "test": []}
    np.testing.assert_allclose(s.params.expr.numpy(), synth.params.expr[:2].numpy(), atol=1e-6)
    (note,) = [n for n in result.notes if "expression components 50-99" in n]
    assert float(note.split("up to ")[1].split(" mm")[0]) > 0.1


def test_bad_input_is_one_error_naming_the_file_and_leaves_nothing(head: HeadModel, synth: Subject, tmp_path: Path) -> None:
    seq = write_release(synth, tmp_path / "017", head, rigid(2), scale=1.0)
    shutil.copy(seq / "images" / f"cam_{SERIALS[0]}.mp4", seq / "images" / "cam_999.mp4")
    with pytest.raises(InputError, match=r"camera_params\.json: has no calibration for camera 999"):
        convert_nersemble(seq, tmp_path / "out", head, NersembleConfig(size=SIZE))
    (seq / "images" / "cam_999.mp4").unlink()
    (tmp_path / "017" / "calibration" / "camera_params.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(InputError, match=r"calibration/camera_params\.json: missing.*--calibration"):
        convert_nersemble(seq, tmp_path / "out", head, NersembleConfig(size=SIZE))
    convert_nersemble(seq, tmp_path / "out", head, NersembleConfig(size=SIZE, max_frames=1), calibration=tmp_path / "elsewhere.json")
    with pytest.raises(InputError, match="has no camera 123.*222200036"):
        convert_nersemble(
            seq, tmp_path / "out2", head, NersembleConfig(size=SIZE, cameras=("123",)), calibration=tmp_path / "elsewhere.json"
        )
    (seq / "tracking" / "flame2023_tracking.npz").unlink()
    shutil.rmtree(seq / "alpha_maps")  # as in the dataset's raw release: the missing tracking is what is said
    with pytest.raises(InputError, match="flame2023_tracking.npz: missing; this converter needs tracked FLAME parameters"):
        convert_nersemble(seq, tmp_path / "out2", head, NersembleConfig(size=SIZE), calibration=tmp_path / "elsewhere.json")

    export = tmp_path / "export"
    write_export(synth, export, head, rigid(1))
    index = json.loads((export / "transforms.json").read_text())
    (export / "transforms.json").write_text(json.dumps({"frames": index["frames"][:-1]}))
    with pytest.raises(InputError, match=r"transforms\.json: timestep 4 has no frame of camera 222200038"):
        convert_nersemble(export, tmp_path / "out", head)
    (export / "transforms.json").write_text(json.dumps(index))
    (export / "flame_param" / "00003.npz").unlink()
    with pytest.raises(InputError, match=r"flame_param/00003\.npz: missing"):
        convert_nersemble(export, tmp_path / "out", head)
    np.savez(
        export / "flame_param" / "00003.npz", **dict(np.load(export / "flame_param" / "00002.npz")), static_offset=np.zeros((1, 10, 3))
    )
    with pytest.raises(InputError, match=r"00003\.npz: 'static_offset' differs from 00000\.npz's"):
        convert_nersemble(export, tmp_path / "out", head)
    for t in range(5):
        path = export / "flame_param" / f"{t:05d}.npz"
        np.savez(path, **{**dict(np.load(path)), "static_offset": np.zeros((1, 10, 3))})
    with pytest.raises(InputError, match="static_offset has 10 vertices, the head model 'builtin-v1' has 9421: load the FLAME 2023 model"):
        convert_nersemble(export, tmp_path / "out", head)
    for t in range(5):
        path = export / "flame_param" / f"{t:05d}.npz"
        np.savez(path, **{k: v for k, v in np.load(path).items() if k != "static_offset"})
    # A frame that breaks while the subject is being written: the earlier subject stays whole.
    (export / "images" / "00004_02.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"00004_02\.png"):
        convert_nersemble(export, tmp_path / "out", head, NersembleConfig(size=SIZE))
    assert Subject.load(tmp_path / "out").num_frames == 1 and not (tmp_path / "out.partial").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a subject")
    with pytest.raises(InputError, match="mine: exists and is not a subject"):
        convert_nersemble(export, tmp_path / "mine", head)
    with pytest.raises(InputError, match="notes.txt: exists and is not a folder"):
        convert_nersemble(export, tmp_path / "mine" / "notes.txt", head)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()


def test_cli(head: HeadModel, synth: Subject, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_export(synth, tmp_path / "seq", head, rigid(1))
    args = ["convert-nersemble", str(tmp_path / "seq"), "--out", str(tmp_path / "out"), "--head", "builtin", "--size", "64"]
    assert main([*args, "--test-cameras", SERIALS[1], "--stride", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cameras"] == [SERIALS[0], SERIALS[2]] and summary["heldout_cameras"] == [SERIALS[1]] and summary["frames"] == 3
    assert Subject.load(summary["heldout_subject"]).info.width == 64
    assert main([*args, "--cameras", "nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"spatialavatar convert-nersemble: error: {tmp_path / 'seq'}: has no camera nope; its cameras: {', '.join(SERIALS)}"
    ]
    assert main([*args, "--stride", "0"]) == 2 and "--stride 0: must be >= 1" in capsys.readouterr().err


def _real_sequences() -> list[Path]:
    if not REAL_SAMPLES.is_dir():
        return []
    return sorted(
        p for p in REAL_SAMPLES.rglob("*") if p.is_dir() and ((p / "transforms.json").is_file() or any((p / "images").glob("cam_*.mp4")))
    )


@pytest.mark.skipif(
    not _real_sequences() or not os.environ.get("SPATIALAVATAR_FLAME"),
    reason="no real NeRSemble sequence in data/nersemble/ (ignored by git), or no FLAME 2023 in $SPATIALAVATAR_FLAME",
)
def test_real_sequence(tmp_path: Path) -> None:
    """A real sequence put into data/nersemble/ by hand: its tracked face lands on its foreground."""
    from backend.head.registry import load_head_model

    flame = load_head_model(os.environ["SPATIALAVATAR_FLAME"])
    for seq in _real_sequences():
        convert_nersemble(seq, tmp_path / seq.name, flame, NersembleConfig(size=256, max_frames=3))
        s = Subject.load(tmp_path / seq.name)
        with torch.no_grad():
            lmk = flame(s.params).landmarks
        for t in range(s.num_frames):
            uv = project(lmk[t], s.cameras(t))[0].long().clamp(0, 255)
            for c in range(s.num_cameras):
                assert s.mask(t, c)[uv[c, :, 1], uv[c, :, 0]].mean() > 0.8, (seq, t, c)
