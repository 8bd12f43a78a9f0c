"""Fitting a FLAME-format head to 2D landmarks: shared identity, per-frame everything else.

The model: one identity (``shape``) for every frame of one person; per frame expression,
jaw, neck, eyes, global rotation and translation; one focal length per input source (a photo,
a video, a folder of frames). Every frame is seen by a pinhole camera in the world frame
(FLAME's: +y up, +z where the face looks) at ``(0, 0, distance)`` looking down -z, so the
head moves and the camera stays put, as in VHAP / GaussianAvatars tracking.

Energy (landmark residuals in units of the frame's inter-ocular distance):

* robust (Geman-McClure) reprojection of the 68 iBUG points and the two iris centres,
  the jaw contour weighted low plus a point-to-curve term to mediapipe's face oval; the
  model's landmarks are built from its mediapipe points as the targets are from a detection
  when the head ships a mediapipe embedding, else they are its own iBUG landmarks
  (``correspondence``);
* L2 priors on shape, expression, jaw (sideways jaw costs more, a jaw closing past rest
  much more), neck, eyes (and the two eyes' difference), and log focal around its guess;
* for sequences, first-difference smoothness of every per-frame parameter.

Coarse to fine: rigid pose (initialized by a Procrustes fit to mediapipe's 3D points),
then everything. Only the vertices the landmarks use are posed (``SparseHead``), so a few
hundred frames fit in seconds on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from smplx.lbs import batch_rigid_transform, batch_rodrigues

from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.tracking.correspondence import (
    ModelPoints,
    ibug68_from_mediapipe,
    inter_ocular,
    mediapipe_targets,
    model_points,
    oval_polyline,
    target_weights,
)

Progress = Callable[[int, int], None]
# OpenCV camera axes in FLAME's world for a camera looking at the face: x right, y down, z = -world z.
CAM_AXES = np.diag([1.0, -1.0, -1.0])


@dataclass(frozen=True)
class FitConfig:
    """Knobs of the landmark fit (defaults tuned on synthetic subjects and real portraits).

    Attributes:
        n_shape / n_expr: leading identity / expression components fitted (clipped to the model's;
            None: all of them). Expression components of a named head (ICT's ARKit channels) are
            not ordered by importance, so leaving some out would silence those channels.
        rigid_steps / full_steps: Adam iterations of the two stages.
        lr: base learning rate (per-group multiples inside).
        robust_sigma: Geman-McClure scale, in inter-ocular distances.
        contour_weight: point-to-oval term for the 17 jaw points (their point-to-point weight is
            in ``correspondence.GROUP_WEIGHTS``).
        iris_weight: weight of the two iris centres.
        w_*: prior weights (sum of squares of each coefficient block, per frame where per frame).
        focal_guess: focal length as a multiple of the longer image side when EXIF has none.
        focal_sigma: prior standard deviation of log focal.
        smooth_*: first-difference weights between neighbouring frames of a sequence.
        fit_eyes: fit eye rotations from the iris centres (needs eyeballs on the model).
        fit_jaw_joint: fit the jaw joint. None: unless an expression of the head carries the
            jaw (``HeadModelData.jaw_expression``): fitting the joint too would open the mouth
            twice over; imported ARKit curves and synthetic motion leave it at rest as well.
        mediapipe_embedding: fit mediapipe's own points embedded on the head when the head ships
            an embedding (``correspondence.MediapipeEmbedding``), so model and detection define
            each landmark the same way; off, or without one, the head's own iBUG landmarks.
        landmark_offsets: learn one small 3D offset per model point, shared by every frame, when
            there are at least this many frames (0 = never). Without an embedding, offsets
            absorb the constant difference between mediapipe's and the head model's landmark
            definitions, which expression coefficients would otherwise take up in every frame.
        w_offset: prior on those offsets, per point, in units of the model's inter-ocular distance squared.
    """

    n_shape: int = 100
    n_expr: int | None = None
    rigid_steps: int = 120
    full_steps: int = 500
    lr: float = 0.01
    robust_sigma: float = 0.1
    contour_weight: float = 0.5
    iris_weight: float = 2.0
    w_shape: float = 1e-6
    w_expr: float = 1e-6
    w_jaw: float = 1e-3
    w_jaw_side: float = 2e-2
    w_jaw_close: float = 1.0
    w_neck: float = 1e-1
    w_eyes: float = 1e-5
    w_eyes_diff: float = 1e-4
    w_focal: float = 1e-3
    focal_guess: float = 1.5
    focal_sigma: float = 0.5
    smooth_expr: float = 1e-5
    smooth_pose: float = 5e-3
    smooth_translation: float = 1.0
    smooth_eyes: float = 1e-4
    fit_eyes: bool = True
    fit_jaw_joint: bool | None = None
    mediapipe_embedding: bool = True
    landmark_offsets: int = 2
    w_offset: float = 1e-3
    seed: int = 0


@dataclass
class FitInput:
    """Landmarks of B frames from S sources.

    Attributes:
        targets: [B, P, 2] correspondence targets in each frame's pixels
            (``correspondence.mediapipe_targets``: 68 iBUG points, then the irises).
        oval: [B, M, 2] the lower face oval polyline the jaw points slide along.
        iod: [B] inter-ocular distance (outer eye corners) of each frame, pixels.
        source: [B] source index of each frame.
        image_size: [B, 2] (width, height) of each frame.
        focal_init: [S] focal guess in pixels (from EXIF when known).
        sequence_pairs: [N, 2] frame pairs that are temporal neighbours (smoothness).
        points3d: [B, 68, 3] iBUG points with a relative depth in pixel scale (mediapipe's),
            for the rigid start; None starts frontal.
    """

    targets: np.ndarray
    oval: np.ndarray
    iod: np.ndarray
    source: np.ndarray
    image_size: np.ndarray
    focal_init: np.ndarray
    sequence_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    points3d: np.ndarray | None = None

    @classmethod
    def from_mediapipe(cls, mp_points: np.ndarray, has_eyes: bool, **kwargs) -> FitInput:  # type: ignore[no-untyped-def]
        """Build from [B, 478, 3] mediapipe landmarks (pixels, mediapipe's relative depth)."""
        mp = np.asarray(mp_points, np.float64)
        return cls(
            targets=mediapipe_targets(mp[..., :2], has_eyes),
            oval=oval_polyline(mp[..., :2]),
            iod=inter_ocular(mp),
            points3d=ibug68_from_mediapipe(mp) if mp.shape[-1] == 3 else None,
            **kwargs,
        )

    @property
    def frames(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class FitResult:
    """The fit, ready for the subject format.

    Attributes:
        params: FlameParams for B frames (shape padded to the model's n_shape, expr to n_expr).
        K: [B, 3, 3] intrinsics in each frame's source pixels.
        world_to_cam: [B, 4, 4] OpenCV extrinsics (fixed per source).
        projected: [B, P, 2] fitted model points in source pixels.
        errors_px: [B, P] reprojection error of each point, pixels.
        iod_px: [B] inter-ocular distance of each frame's detected landmarks, pixels.
        focal: [S] fitted focal lengths, pixels.
        has_eyes: whether the two iris points were fitted.
        history: loss after each stage.
        offsets: [R, 3] the learned offsets of the raw model points (``ModelPoints.count``) in
            metres (head frame), None when not used;
            ``projected`` and ``errors_px`` leave them out, as the stored parameters do.
    """

    params: FlameParams
    K: torch.Tensor
    world_to_cam: torch.Tensor
    projected: np.ndarray
    errors_px: np.ndarray
    iod_px: np.ndarray
    focal: np.ndarray
    has_eyes: bool
    history: dict[str, float]
    offsets: np.ndarray | None = None

    def landmark_error(self, points: slice | np.ndarray = slice(0, 68)) -> dict[str, float]:
        """Mean reprojection error over frames and the chosen points: pixels and % of IOD."""
        e = self.errors_px[:, points]
        rel = e / self.iod_px[:, None]
        return {"px": float(e.mean()), "iod_percent": float(100.0 * rel.mean())}


class SparseHead(torch.nn.Module):
    """A HeadModel posed only at chosen vertices and with only the leading coefficients.

    The same linear blend skinning as smplx (shape and expression blend shapes, pose
    correctives, joints regressed from the shaped mesh), restricted to ``vertex_ids`` and to
    the first ``n_shape`` / ``n_expr`` components, so a landmark fit costs little per frame.
    """

    def __init__(self, head: HeadModel, vertex_ids: np.ndarray, n_shape: int | None = None, n_expr: int | None = None) -> None:
        super().__init__()
        ids = torch.as_tensor(np.asarray(vertex_ids, np.int64))
        n_shape = head.n_shape if n_shape is None else n_shape
        n_expr = head.n_expr if n_expr is None else n_expr
        cols = torch.cat([torch.arange(n_shape), head.n_shape + torch.arange(n_expr)])
        dirs = head.dirs[:, :, cols]  # [V, 3, S' + E']
        n = len(ids)
        self.register_buffer("ids", ids)
        self.register_buffer("template", head.v_template[ids].reshape(-1).clone())  # [n*3]
        self.register_buffer("shape_dirs", dirs[ids, :, :n_shape].reshape(n * 3, n_shape).clone())
        self.register_buffer("expr_dirs", dirs[ids, :, n_shape:].reshape(n * 3, n_expr).clone())
        pcols = (ids[:, None] * 3 + torch.arange(3)).reshape(-1)
        self.register_buffer("posedirs", head.posedirs[:, pcols].clone())  # [(J-1)*9, n*3]
        self.register_buffer("weights", head.weights[ids].clone())  # [n, J]
        j_dirs = torch.einsum("jv,vck->jck", head.j_regressor, dirs)
        n_j = head.j_regressor.shape[0]
        self.register_buffer("j_template", (head.j_regressor @ head.v_template).reshape(-1))  # [J*3]
        self.register_buffer("j_shape_dirs", j_dirs[..., :n_shape].reshape(n_j * 3, n_shape).clone())
        self.register_buffer("j_expr_dirs", j_dirs[..., n_shape:].reshape(n_j * 3, n_expr).clone())
        self.register_buffer("parents", head.parents.clone())
        self.n_shape, self.n_expr, self.n_joints = n_shape, n_expr, n_j

    def forward(self, shape: torch.Tensor, expr: torch.Tensor, pose: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        """shape [S'], expr [B, E'], pose [B, J*3], translation [B, 3] -> vertices [B, n, 3]."""
        b = expr.shape[0]
        v_shaped = (self.template + self.shape_dirs @ shape) + expr @ self.expr_dirs.T  # [B, n*3]
        joints = ((self.j_template + self.j_shape_dirs @ shape) + expr @ self.j_expr_dirs.T).reshape(b, self.n_joints, 3)
        rot = batch_rodrigues(pose.reshape(-1, 3)).reshape(b, -1, 3, 3)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(b, -1)
        v_posed = (v_shaped + pose_feature @ self.posedirs).reshape(b, -1, 3)
        _, A = batch_rigid_transform(rot, joints, self.parents)
        T = (self.weights @ A.reshape(b, self.n_joints, 16)).reshape(b, -1, 4, 4)
        v = (T[..., :3, :3] @ v_posed[..., None])[..., 0] + T[..., :3, 3]
        return v + translation[:, None]


def geman_mcclure(sq: torch.Tensor, sigma: float) -> torch.Tensor:
    """rho(e) = e^2 / (1 + e^2 / sigma^2), applied to squared residuals ``sq``: e^2 near 0, sigma^2 far out."""
    return sq / (1.0 + sq / sigma**2)


def point_to_polyline(p: torch.Tensor, poly: torch.Tensor) -> torch.Tensor:
    """Distance of points [B, N, 2] to polylines [B, M, 2] -> [B, N]."""
    a, b = poly[:, :-1], poly[:, 1:]  # [B, M-1, 2]
    ab = b - a
    ap = p[:, :, None] - a[:, None]  # [B, N, M-1, 2]
    t = ((ap * ab[:, None]).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-9)[:, None]).clamp(0.0, 1.0)
    d = ap - t[..., None] * ab[:, None]
    return d.norm(dim=-1).min(dim=-1).values


def _rotmat_to_axis_angle(R: np.ndarray) -> np.ndarray:
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    n = np.linalg.norm(axis)
    if n < 1e-8:  # angle near pi: take the axis from the symmetric part
        _w, v = np.linalg.eigh((R + np.eye(3)) / 2.0)
        return v[:, -1] * angle
    return axis / n * angle


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimizing |dst - (s R src + t)|^2 over point sets [N, 3]."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1
    R = U @ D @ Vt
    s = float(np.trace(np.diag(S) @ D) / max((a**2).sum() / len(src), 1e-12))
    return s, R, mu_d - s * R @ mu_s


def default_focal(width: int, height: int, config: FitConfig) -> float:
    return config.focal_guess * max(width, height)


class LandmarkFitter:
    """Fits one HeadModel to FitInput; see the module docstring for the energy."""

    def __init__(self, head: HeadModel, config: FitConfig = FitConfig()) -> None:
        self.head = head
        self.config = config
        self.points: ModelPoints = model_points(head.data, use_eyes=config.fit_eyes, mediapipe=config.mediapipe_embedding)
        used = self.points.vertices()
        remap = {int(v): i for i, v in enumerate(used)}
        blend = np.zeros((self.points.count, len(used)))
        for p in range(self.points.count):
            for v, w in zip(self.points.vertex_index[p], self.points.vertex_weight[p]):
                if w != 0:
                    blend[p, remap[int(v)]] += w
        self.blend = torch.as_tensor(blend, dtype=torch.float32)  # [R, n]: raw model points from the posed vertices
        self.n_shape = min(config.n_shape, head.n_shape)
        self.n_expr = head.n_expr if config.n_expr is None else min(config.n_expr, head.n_expr)
        self.sparse = SparseHead(head.to("cpu"), used, self.n_shape, self.n_expr)

    @property
    def has_eyes(self) -> bool:
        return self.points.has_eyes

    @property
    def fits_jaw_joint(self) -> bool:
        """Whether the fit moves the jaw joint (``FitConfig.fit_jaw_joint``)."""
        if self.config.fit_jaw_joint is not None:
            return self.config.fit_jaw_joint
        return self.head.data.jaw_expression is None

    def raw_points(self, shape: torch.Tensor, expr: torch.Tensor, pose: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        """[B, R, 3] the raw model points (``ModelPoints``) of the posed head, world frame."""
        v = self.sparse(shape, expr, pose, translation)  # [B, n, 3]
        return self.blend @ v

    def model_points(self, shape: torch.Tensor, expr: torch.Tensor, pose: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        """[B, P, 3] the landmarks in 3D (a jaw contour resampled along the 3D oval: for starting poses, not for the energy)."""
        return self.points.landmarks(self.raw_points(shape, expr, pose, translation))

    def neutral_points(self) -> np.ndarray:
        """[P, 3] the landmarks (3D) at zero shape, expression and pose."""
        with torch.no_grad():
            z = torch.zeros(1, 3)
            pose = torch.zeros(1, self.head.data.num_joints * 3)
            return self.model_points(torch.zeros(self.n_shape), torch.zeros(1, self.n_expr), pose, z)[0].numpy()

    @staticmethod
    def project(points: torch.Tensor, focal: torch.Tensor, centre: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """World points [B, P, 3] -> pixels [B, P, 2] for the camera at (0, 0, distance) looking down -z."""
        depth = (distance[:, None] - points[..., 2]).clamp_min(1e-3)
        x = points[..., 0] / depth
        y = -points[..., 1] / depth
        return torch.stack([x, y], dim=-1) * focal[:, None, None] + centre[:, None, :]

    # -- initialization ----------------------------------------------------------------------

    def _rigid_init(self, data: FitInput, focal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-frame rotation and translation from a Procrustes fit to mediapipe's 3D points, and per-source camera distance."""
        b = data.frames
        neutral = self.neutral_points()
        inner = slice(17, 68)
        src = neutral[inner] @ CAM_AXES.T  # model points in camera axes (metres)
        rot = np.zeros((b, 3))
        depth = np.zeros(b)
        for i in range(b):
            if data.points3d is not None:
                s, R, _ = umeyama(src, data.points3d[i, inner])  # pixels, depth in pixel scale
                rot[i] = _rotmat_to_axis_angle(CAM_AXES.T @ R @ CAM_AXES)
            else:  # no depth: scale from the 2D spread, frontal start
                tgt = data.targets[i, inner]
                s = float(np.sqrt(((tgt - tgt.mean(0)) ** 2).sum(-1).mean() / ((src[:, :2] - src[:, :2].mean(0)) ** 2).sum(-1).mean()))
            depth[i] = focal[data.source[i]] / max(s, 1e-6)
        distance = np.zeros(len(focal))
        for k in range(len(distance)):
            sel = data.source == k
            distance[k] = round(float(np.median(depth[sel])), 2) if sel.any() else 1.0
        # Translation: put the rotated model's landmark centroid on the ray through the target centroid.
        trans = np.zeros((b, 3))
        with torch.no_grad():
            pose = torch.zeros(b, self.head.data.num_joints * 3)
            pose[:, :3] = torch.as_tensor(rot, dtype=torch.float32)
            pts = self.model_points(torch.zeros(self.n_shape), torch.zeros(b, self.n_expr), pose, torch.zeros(b, 3)).numpy()
        for i in range(b):
            k = data.source[i]
            w, h = data.image_size[i]
            c = data.targets[i, inner].mean(0)
            m = pts[i, inner].mean(0)
            z = depth[i]
            want = np.array([(c[0] - w / 2) * z / focal[k], -(c[1] - h / 2) * z / focal[k], distance[k] - z])
            trans[i] = want - m
        return rot, trans, distance

    # -- the fit -----------------------------------------------------------------------------

    def fit(self, data: FitInput, progress: Progress | None = None) -> FitResult:
        # The tensors here are small: one thread is several times faster than two fighting over
        # a busy CPU (and never slower), so the fit runs single-threaded.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit(data, progress)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, data: FitInput, progress: Progress | None = None) -> FitResult:
        """The loop: build the problem and its stages, run each stage's Adam steps, read the result off."""
        torch.manual_seed(self.config.seed)
        focal0 = np.asarray(data.focal_init, np.float64)
        rot0, trans0, distance = self._rigid_init(data, focal0)
        problem = FitProblem(self, data, distance)
        v = FitVariables.start(problem, rot0, trans0, focal0, self.fits_jaw_joint)
        stages = fit_stages(v, self.config, self.has_eyes, problem.use_offsets, self.fits_jaw_joint)
        total = sum(st.steps for st in stages)
        done = 0
        history: dict[str, float] = {}
        for st in stages:
            opt = torch.optim.Adam(st.groups)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, st.rate) if st.rate else None
            loss = torch.tensor(float("nan"))
            for _ in range(st.steps):
                opt.zero_grad()
                loss, _ = problem.energy(v, st.name)
                loss.backward()
                opt.step()
                if sched:
                    sched.step()
                done += 1
                if progress and done % 10 == 0:
                    progress(done, total)
            history[st.name] = float(loss.detach())
        if progress and total % 10:
            progress(total, total)
        return problem.result(v, history)


@dataclass
class FitVariables:
    """The unknowns of one fit (leaf tensors that take gradients).

    Attributes:
        shape: [S'] identity coefficients, shared by every frame.
        expr: [B, E'] expression coefficients.
        rot, neck, jaw: [B, 3] axis-angle, global rotation then FLAME's neck and jaw joints.
        eyes: [B, 6] the two eye joints' axis-angles (FLAME's order).
        trans: [B, 3] translation, metres.
        log_f: [S] log focal length of each source, pixels.
        offsets: [R, 3] raw model point offsets in the head frame, in model inter-ocular distances
            (they take gradients only when the fit learns them).
    """

    shape: torch.Tensor
    expr: torch.Tensor
    rot: torch.Tensor
    neck: torch.Tensor
    jaw: torch.Tensor
    eyes: torch.Tensor
    trans: torch.Tensor
    log_f: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def start(cls, problem: FitProblem, rot0: np.ndarray, trans0: np.ndarray, focal0: np.ndarray, fits_jaw: bool) -> FitVariables:
        """Zero identity, expression, neck, jaw, eyes and offsets; the rigid start's pose; the focal
        guess. Without ``fits_jaw`` the jaw joint is a constant at rest (an expression carries it)."""
        b, f32 = problem.frames, torch.float32
        return cls(
            shape=torch.zeros(problem.n_shape, requires_grad=True),
            expr=torch.zeros(b, problem.n_expr, requires_grad=True),
            rot=torch.as_tensor(rot0, dtype=f32).clone().requires_grad_(True),
            neck=torch.zeros(b, 3, requires_grad=True),
            jaw=torch.zeros(b, 3, requires_grad=fits_jaw),
            eyes=torch.zeros(b, 6, requires_grad=True),
            trans=torch.as_tensor(trans0, dtype=f32).clone().requires_grad_(True),
            log_f=torch.as_tensor(np.log(focal0), dtype=f32).clone().requires_grad_(True),
            offsets=torch.zeros(problem.n_raw, 3, requires_grad=problem.use_offsets),
        )

    def pose(self, n_joints: int) -> torch.Tensor:
        """[B, J*3] FLAME's pose vector (global, neck, jaw, eyes; further joints at rest)."""
        b = self.rot.shape[0]
        return torch.cat([self.rot, self.neck, self.jaw, self.eyes, torch.zeros(b, max(0, n_joints * 3 - 18))], dim=1)[:, : n_joints * 3]


@dataclass(frozen=True)
class Stage:
    """One optimization stage: its energy (``FitProblem.energy``'s stage name), Adam steps,
    parameter groups with their rates, and an optional rate multiplier per step (LambdaLR)."""

    name: str
    steps: int
    groups: list[dict]
    rate: Callable[[int], float] | None = None


def fit_stages(v: FitVariables, cfg: FitConfig, has_eyes: bool, use_offsets: bool, fits_jaw: bool = True) -> list[Stage]:
    """Coarse to fine: the rigid pose on the inner landmarks, then everything with a cosine-decayed
    rate. Without ``fits_jaw`` the jaw joint stays at rest (its start)."""
    lr = cfg.lr
    groups = [
        {"params": [v.rot, v.neck, *([v.jaw] if fits_jaw else [])], "lr": lr},
        {"params": [v.trans], "lr": lr * 0.2},
        {"params": [v.shape, v.expr], "lr": lr * 5},
        {"params": [v.log_f], "lr": lr},
    ]
    if has_eyes:
        groups.append({"params": [v.eyes], "lr": lr * 2})
    if use_offsets:
        groups.append({"params": [v.offsets], "lr": lr * 0.5})

    def cosine(step: int) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / max(cfg.full_steps, 1), 1.0)))

    return [
        Stage("rigid", cfg.rigid_steps, [{"params": [v.rot], "lr": lr}, {"params": [v.trans], "lr": lr * 0.2}]),
        Stage("full", cfg.full_steps, groups, cosine),
    ]


class FitProblem:
    """The step builder: one fit's targets, weights and priors as tensors, and the energy of
    each stage as a function of ``FitVariables`` (see the module docstring for the terms).

    Stage "rigid" is plain least squares on the inner landmarks; stage "full" is the robust
    energy on every point, the jaw contour's point-to-oval term, the priors and smoothness.
    """

    def __init__(self, fitter: LandmarkFitter, data: FitInput, distance: np.ndarray) -> None:
        f32 = torch.float32
        self.fitter, self.data, self.cfg, self.distance = fitter, data, fitter.config, distance
        self.frames, self.n_shape, self.n_expr = data.frames, fitter.n_shape, fitter.n_expr
        self.n_joints = fitter.head.data.num_joints
        self.n_raw = fitter.points.count
        self.n_points = fitter.points.landmark_count
        self.has_eyes = fitter.has_eyes
        self.src = torch.as_tensor(data.source, dtype=torch.long)
        sizes = torch.as_tensor(np.asarray(data.image_size, np.float64), dtype=f32)
        self.centre = sizes / 2.0
        self.dist = torch.as_tensor(distance, dtype=f32)[self.src]
        self.targets = torch.as_tensor(data.targets, dtype=f32)[:, : self.n_points]
        self.oval = torch.as_tensor(data.oval, dtype=f32)
        self.iod = torch.as_tensor(np.asarray(data.iod, np.float64), dtype=f32).clamp_min(1.0)
        self.w_pts = torch.as_tensor(target_weights(self.has_eyes, self.cfg.iris_weight)[: self.n_points], dtype=f32)
        self.log_f0 = torch.as_tensor(np.log(np.asarray(data.focal_init, np.float64)), dtype=f32)
        self.use_offsets = self.cfg.landmark_offsets > 0 and data.frames >= self.cfg.landmark_offsets
        neutral = fitter.neutral_points()
        self.model_iod = float(np.linalg.norm(neutral[36] - neutral[45]))
        self.pairs = torch.as_tensor(np.asarray(data.sequence_pairs, np.int64).reshape(-1, 2))

    def project(self, v: FitVariables) -> torch.Tensor:
        """[B, P, 2] the model's landmarks (learned offsets included) in each frame's pixels."""
        pts = self.fitter.raw_points(v.shape, v.expr, v.pose(self.n_joints), v.trans)
        if self.use_offsets:
            # Offsets live in the head's frame: turn them with the head (global rotation, then neck).
            R = batch_rodrigues(v.rot) @ batch_rodrigues(v.neck)
            pts = pts + self.model_iod * torch.einsum("bij,pj->bpi", R, v.offsets)
        # Landmarks are built after projection, as the detections' are (the jaw contour is
        # resampled along the projected face oval).
        return self.fitter.points.landmarks(self.fitter.project(pts, v.log_f.exp()[self.src], self.centre, self.dist))

    def energy(self, v: FitVariables, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's scalar energy, and the projected points [B, P, 2] it was computed from."""
        uv = self.project(v)
        sq = (((uv - self.targets) / self.iod[:, None, None]) ** 2).sum(-1)
        w = self.w_pts.clone()
        if stage == "rigid":
            w[:17] = 0.0
            if self.has_eyes:
                w[68:] = 0.0
            return ((sq * w).sum(-1) / w.sum()).mean(), uv
        cfg = self.cfg
        rho = geman_mcclure(sq, cfg.robust_sigma)
        # Jaw points also slide along the face oval: distance to the curve, robust, as extra terms.
        contour = point_to_polyline(uv[:, :17], self.oval) / self.iod[:, None]
        rho_c = geman_mcclure(contour**2, cfg.robust_sigma)
        e = (((rho * w).sum(-1) + cfg.contour_weight * rho_c.sum(-1)) / (w.sum() + 17 * cfg.contour_weight)).mean()
        return e + self.prior(v), uv

    def prior(self, v: FitVariables) -> torch.Tensor:
        """L2 priors on every block, and first-difference smoothness over the sequence pairs."""
        cfg = self.cfg
        prior = cfg.w_shape * (v.shape**2).sum()
        if self.use_offsets:
            prior = prior + cfg.w_offset * (v.offsets**2).sum()
        prior = prior + cfg.w_expr * (v.expr**2).sum(-1).mean()
        prior = prior + cfg.w_jaw * (v.jaw[:, 0] ** 2).mean() + cfg.w_jaw_side * (v.jaw[:, 1:] ** 2).sum(-1).mean()
        prior = prior + cfg.w_jaw_close * (torch.relu(-v.jaw[:, 0]) ** 2).mean()
        prior = prior + cfg.w_neck * (v.neck**2).sum(-1).mean()
        prior = prior + cfg.w_eyes * (v.eyes**2).sum(-1).mean() + cfg.w_eyes_diff * ((v.eyes[:, :3] - v.eyes[:, 3:]) ** 2).sum(-1).mean()
        prior = prior + cfg.w_focal * (((v.log_f - self.log_f0) / cfg.focal_sigma) ** 2).sum()
        if len(self.pairs):
            i, j = self.pairs[:, 0], self.pairs[:, 1]

            def d2(t: torch.Tensor) -> torch.Tensor:
                return ((t[i] - t[j]) ** 2).sum(-1).mean()

            prior = prior + cfg.smooth_expr * d2(v.expr) + cfg.smooth_pose * (d2(v.rot) + d2(v.jaw) + d2(v.neck))
            prior = prior + cfg.smooth_translation * d2(v.trans) + cfg.smooth_eyes * d2(v.eyes)
        return prior

    @torch.no_grad()
    def result(self, v: FitVariables, history: dict[str, float]) -> FitResult:
        """The fit for the subject format; errors are what the stored parameters give: the model's own points, without the offsets."""
        learned = v.offsets.detach().clone() * self.model_iod
        v.offsets.zero_()
        uv = self.project(v)
        err = (uv - self.targets).norm(dim=-1).numpy()
        focal = v.log_f.exp().numpy().astype(np.float64)
        head, b = self.fitter.head, self.frames
        params = head.neutral_params(b)
        params.shape = torch.nn.functional.pad(v.shape.detach(), (0, head.n_shape - self.n_shape))
        params.expr = torch.nn.functional.pad(v.expr.detach(), (0, head.n_expr - self.n_expr))
        params.rotation = v.rot.detach().clone()
        params.translation = v.trans.detach().clone()
        params.neck_pose = v.neck.detach().clone()
        params.jaw_pose = v.jaw.detach().clone()
        params.eyes_pose = v.eyes.detach().clone()
        K = torch.zeros(b, 3, 3)
        w2c = torch.zeros(b, 4, 4)
        for i in range(b):
            k = int(self.data.source[i])
            w, h = self.data.image_size[i]
            K[i] = torch.tensor([[focal[k], 0, w / 2.0], [0, focal[k], h / 2.0], [0, 0, 1]])
            w2c[i] = camera_pose(float(self.distance[k]))
        return FitResult(
            params=params,
            K=K,
            world_to_cam=w2c,
            projected=uv.numpy().astype(np.float64),
            errors_px=err.astype(np.float64),
            iod_px=self.iod.numpy().astype(np.float64),
            focal=focal,
            has_eyes=self.has_eyes,
            history=history,
            offsets=learned.numpy().astype(np.float64) if self.use_offsets else None,
        )


def camera_pose(distance: float) -> torch.Tensor:
    """[4, 4] world_to_cam of the tracking camera: at (0, 0, distance), looking down -z, +y up."""
    T = torch.eye(4)
    T[:3, :3] = torch.as_tensor(CAM_AXES, dtype=torch.float32)
    T[2, 3] = distance
    return T
