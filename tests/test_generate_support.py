"""Support for the generator tests: a tiny FLAME-format head and tiny synthetic corpora.

The tiny head is an ellipsoid with a nose, a jaw joint, eye joints and a latitude-longitude
UV map (a few hundred vertices), so generator tests run in seconds on the CPU and do not
depend on the built-in head. Every array follows ``HeadModelData``'s layout exactly.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from backend.data.synthetic import SynthConfig, synthesize
from backend.generate.data import Batch, Corpus, Sample, find_subjects
from backend.generate.model import Generator, preset
from backend.generate.train import TrainConfig, compute_loss, teardown_distributed
from backend.head.model import FLAME_SHAPE_SPACE, HeadModel, HeadModelData

SEMI_AXES = (0.075, 0.1, 0.09)


def _tiny_head_data(n_lat: int = 14, n_lon: int = 24, n_shape: int = 8, n_expr: int = 8) -> HeadModelData:
    a, b, c = SEMI_AXES
    theta = np.pi * np.arange(1, n_lat + 1) / (n_lat + 1)  # polar angle from +y, rings only
    phi = np.pi + 2 * np.pi * np.arange(n_lon) / n_lon  # seam at the back (-z)
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([a * np.sin(th) * np.sin(ph), b * np.cos(th), c * np.sin(th) * np.cos(ph)], -1).reshape(-1, 3)
    verts = np.concatenate([ring, [[0.0, b, 0.0], [0.0, -b, 0.0]]]).astype(np.float64)
    top, bottom = n_lat * n_lon, n_lat * n_lon + 1
    # A nose: push the front centre forward.
    d = verts / np.array(SEMI_AXES)
    verts[:, 2] += 0.02 * np.exp(-((d[:, 0] / 0.18) ** 2 + ((d[:, 1] + 0.05) / 0.3) ** 2)) * (d[:, 2] > 0)

    def vid(i: int, j: int) -> int:
        return i * n_lon + (j % n_lon)

    n_uv_cols = n_lon + 1

    def uid(i: int, j: int) -> int:
        return i * n_uv_cols + j

    uv = [[j / n_lon, 1.0 - (i + 1) / (n_lat + 1)] for i in range(n_lat) for j in range(n_uv_cols)]
    faces, uv_faces = [], []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            faces += [[vid(i, j), vid(i + 1, j), vid(i + 1, j + 1)], [vid(i, j), vid(i + 1, j + 1), vid(i, j + 1)]]
            uv_faces += [[uid(i, j), uid(i + 1, j), uid(i + 1, j + 1)], [uid(i, j), uid(i + 1, j + 1), uid(i, j + 1)]]
    for j in range(n_lon):
        uv.append([(j + 0.5) / n_lon, 1.0])
        faces.append([top, vid(0, j), vid(0, j + 1)])
        uv_faces.append([len(uv) - 1, uid(0, j), uid(0, j + 1)])
        uv.append([(j + 0.5) / n_lon, 0.0])
        faces.append([bottom, vid(n_lat - 1, j + 1), vid(n_lat - 1, j)])
        uv_faces.append([len(uv) - 1, uid(n_lat - 1, j + 1), uid(n_lat - 1, j)])
    faces_np, uv_faces_np = np.array(faces, np.int64), np.array(uv_faces, np.int64)
    tri = verts[faces_np]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    if float((normals * tri.mean(1)).sum()) < 0:  # make the winding counter-clockwise from outside
        faces_np, uv_faces_np = faces_np[:, ::-1].copy(), uv_faces_np[:, ::-1].copy()
    v = verts.shape[0]
    joints_at = np.array([[0, -0.09, -0.01], [0, -0.07, -0.01], [0, -0.03, 0.02], [0.03, 0.03, 0.06], [-0.03, 0.03, 0.06]])
    j_reg = np.zeros((5, v))
    for j, p in enumerate(joints_at):
        near = np.argsort(np.linalg.norm(verts - p, axis=1))[:4]
        j_reg[j, near] = 0.25
    weights = np.zeros((v, 5))
    jaw = np.clip((-(d[:, 1]) - 0.15) / 0.3, 0, 1) * (d[:, 2] > 0.2)
    weights[:, 2] = jaw
    weights[:, 1] = 1 - jaw
    rng = np.random.default_rng(7)
    normal = verts / np.linalg.norm(verts, axis=1, keepdims=True)
    shapedirs = np.zeros((v, 3, FLAME_SHAPE_SPACE + n_expr))
    for k in range(n_shape):
        freq, phase = rng.normal(0, 15, 3), rng.uniform(0, 2 * np.pi)
        shapedirs[:, :, k] = normal * (0.004 * np.sin(verts @ freq + phase))[:, None]
    for k in range(n_expr):
        centre = np.array([rng.uniform(-0.04, 0.04), rng.uniform(-0.06, 0.04), 0.09])
        bump = np.exp(-np.sum((verts - centre) ** 2, axis=1) / 0.03**2)
        shapedirs[:, :, FLAME_SHAPE_SPACE + k] = normal * (0.003 * bump)[:, None]
    front = np.nonzero(tri.mean(1)[:, 2] > 0.05)[0]
    lmk_faces = front[np.linspace(0, len(front) - 1, 68).astype(np.int64)]
    return HeadModelData(
        name="tiny-test-head",
        v_template=verts.astype(np.float32),
        faces=faces_np,
        shapedirs=shapedirs.astype(np.float32),
        posedirs=np.zeros((v, 3, 36), np.float32),
        j_regressor=j_reg.astype(np.float32),
        weights=weights.astype(np.float32),
        parents=np.array([-1, 0, 1, 1, 1], np.int64),
        uv_coords=np.array(uv, np.float32),
        uv_faces=uv_faces_np,
        lmk_faces=lmk_faces.astype(np.int64),
        lmk_bary=np.full((68, 3), 1 / 3, np.float32),
        n_shape=n_shape,
        n_expr=n_expr,
    )


@lru_cache(maxsize=1)
def tiny_head_data() -> HeadModelData:
    return _tiny_head_data()


def tiny_head() -> HeadModel:
    return HeadModel(tiny_head_data())


def tiny_corpus(root: Path, mono: int = 3, multi: int = 2, size: int = 64) -> tuple[list[Path], list[Path]]:
    """A few tiny synthetic subjects: ``mono`` monocular (5 frames), ``multi`` multi-view (2 frames x 6 views)."""
    head = tiny_head()
    mono_dirs = [
        synthesize(head, root / f"mono_{i:02d}", SynthConfig(frames=5, views=1, size=size, seed=100 + i, reference_gaussians=12_000))
        for i in range(mono)
    ]
    multi_dirs = [
        synthesize(head, root / f"multi_{i:02d}", SynthConfig(frames=2, views=6, size=size, seed=200 + i, reference_gaussians=12_000))
        for i in range(multi)
    ]
    return mono_dirs, multi_dirs


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread: these small tensors gain nothing from more, and CI cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fixed_batch(head: HeadModel, mono_dirs: list[Path], device: str = "cpu") -> Batch:
    """Two fixed phase-1 samples (K = 2, one target each) of the first two monocular subjects."""
    corpus = Corpus(find_subjects(mono_dirs), head, device)
    samples = [Sample(0, ((0, 0), (2, 0)), ((4, 0),)), Sample(1, ((1, 0), (3, 0)), ((0, 0),))]
    return corpus.batch(samples)


def seeded_model(head: HeadModel) -> Generator:
    """The tiny generator with a random output layer, so every weight gets a gradient."""
    torch.manual_seed(0)
    model = Generator.for_head(preset("tiny"), head)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.decoder.head.weight.copy_(0.01 * torch.randn(model.decoder.head.weight.shape, generator=gen))
    return model


def ddp_gradient_worker(rank: int, world: int, port: int, backend: str, mono_dirs: list[Path], out: Path) -> None:
    """One DDP rank (gloo on the CPU, nccl on cuda:rank) on its share of ``fixed_batch``; rank 0
    saves the rank-mean loss and the averaged gradients to ``out``. For ``mp.spawn``."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NCCL_NVLS_ENABLE": "0"}
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        head = tiny_head().to(device)
        model = seeded_model(head).to(device)
        part = fixed_batch(head, mono_dirs, str(device)).split(world, rank)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None, broadcast_buffers=False)
        loss, _ = compute_loss(net, part, TrainConfig())
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
            torch.save({"loss": float(mean_loss) / world, "grads": grads}, out)
    finally:
        teardown_distributed()


def assert_ddp_matches_union_batch(got: dict, mono_dirs: list[Path], device: str = "cpu", rel: float = 1e-4) -> None:
    """``ddp_gradient_worker``'s loss and gradients equal one process's on the union batch."""
    head = tiny_head().to(device)
    model = seeded_model(head).to(device)
    loss, _ = compute_loss(model, fixed_batch(head, mono_dirs, device), TrainConfig())
    loss.backward()
    assert got["loss"] == pytest.approx(float(loss.detach()), rel=rel)
    nonzero = 0
    for name, p in model.named_parameters():
        ref, ddp = p.grad.cpu(), got["grads"][name]
        scale = float(ref.abs().max()) + 1e-12
        assert float((ref - ddp).abs().max()) <= rel * scale + 1e-9, name
        nonzero += int(scale > 1e-10)
    assert nonzero > 0.9 * len(got["grads"])
