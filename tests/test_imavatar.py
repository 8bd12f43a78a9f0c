"""Converting the IMavatar / SplattingAvatar benchmark layout (a small fixture written here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from backend.data.imavatar import IMAVATAR_SCALE, convert_imavatar
from backend.data.subject import Subject
from backend.render.camera import intrinsics, look_at, project
from backend.wire.errors import InputError


def write_fixture(root, frames: int = 6, size: int = 32):  # type: ignore[no-untyped-def]
    """An IMavatar-layout sequence whose cameras are known in our convention."""
    rng = np.random.default_rng(0)
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    K = intrinsics(size, size, focal_px=2.2 * size, principal_point=(15.0, 17.0)).numpy()
    ours, records = [], []
    for i in range(frames):
        eye = torch.tensor([0.1 * np.sin(i), 0.05, 0.8])
        w2c = look_at(eye, (0.0, 0.0, 0.0)).numpy()
        ours.append(w2c)
        gl = w2c.copy()
        gl[:3, 3] *= IMAVATAR_SCALE  # their FLAME is 4x larger
        gl[1:3, :] *= -1.0  # their camera axes: y up, z backward
        records.append(
            {
                "file_path": f"./image/{i + 1}",
                "world_mat": gl[:3].tolist(),
                "expression": rng.normal(size=50).tolist(),
                "pose": rng.normal(scale=0.1, size=15).tolist(),
                "bbox": [-1, -1, 1, 1],
            }
        )
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "image" / f"{i + 1}.png")
        Image.fromarray(np.full((size, size), 255, np.uint8)).save(root / "mask" / f"{i + 1}.png")
    meta = {
        "intrinsics": [K[0, 0] / size, -K[1, 1] / size, K[0, 2] / size, K[1, 2] / size],  # sign as in some of their files
        "shape_params": rng.normal(size=100).tolist(),
        "frames": records,
    }
    (root / "flame_params.json").write_text(json.dumps(meta))
    return np.stack(ours), K, meta


def test_convert_imavatar_fixture(tmp_path) -> None:
    ours, K, meta = write_fixture(tmp_path / "seq")
    subject_dir = convert_imavatar(tmp_path / "seq", tmp_path / "subject", test_frames=2)
    s = Subject.load(subject_dir)
    assert s.num_frames == 6 and s.split == {"train": [0, 1, 2, 3], "test": [4, 5]}
    np.testing.assert_allclose(s.K[:, 0].numpy(), np.broadcast_to(K, (6, 3, 3)), atol=1e-4)
    np.testing.assert_allclose(s.world_to_cam[:, 0].numpy(), ours, atol=1e-5)
    p = s.params
    np.testing.assert_allclose(p.jaw_pose.numpy(), np.array([f["pose"][6:9] for f in meta["frames"]]), atol=1e-6)
    np.testing.assert_allclose(p.eyes_pose.numpy(), np.array([f["pose"][9:15] for f in meta["frames"]]), atol=1e-6)
    np.testing.assert_allclose(p.shape.numpy(), np.array(meta["shape_params"]), atol=1e-6)
    # The head centre projects to where the original camera put it.
    xy, _ = project(torch.zeros(1, 3), s.cameras(0))
    assert torch.allclose(xy[0, 0], torch.tensor([K[0, 2], K[1, 2]]), atol=0.5)
    img = np.asarray(Image.open(tmp_path / "seq" / "image" / "3.png"), dtype=np.float32) / 255
    assert torch.allclose(s.image(2), torch.from_numpy(img), atol=1 / 255)


def test_convert_refuses_malformed_input(tmp_path) -> None:
    with pytest.raises(InputError, match="no flame_params.json"):
        convert_imavatar(tmp_path, tmp_path / "out")
    write_fixture(tmp_path / "seq")
    meta = json.loads((tmp_path / "seq" / "flame_params.json").read_text())
    meta["frames"][2]["pose"] = [0.0] * 12
    (tmp_path / "seq" / "flame_params.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="pose"):
        convert_imavatar(tmp_path / "seq", tmp_path / "out")
