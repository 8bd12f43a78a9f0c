"""Accuracy of a tracking against known parameters (synthetic subjects).

Errors reported per frame and averaged:

* ``landmark_px`` / ``landmark_iod_percent``: the fitted model's 68 iBUG landmarks, projected
  by the fitted camera, against the true model's landmarks projected by the true camera
  (not against mediapipe: this is the error that matters downstream);
* ``head_rotation_deg``: angle between the true and fitted head orientation seen from the
  camera (global rotation composed with the neck, so the split between them is free);
* ``jaw_deg``: angle between the true and fitted jaw rotations;
* ``gaze_deg``: angle between the true and fitted eye rotations (mean of both eyes);
* ``expression_mm``: mean distance over the face's vertices between the true shape posed
  with the true expression and jaw, and the same shape with the fitted expression and jaw
  (zero head pose): expression error as geometry, independent of the basis;
* ``expression_coeff_rmse``: RMSE of the expression coefficients themselves.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from smplx.lbs import batch_rodrigues

from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.render.camera import Cameras, project


def _angle_deg(Ra: torch.Tensor, Rb: torch.Tensor) -> torch.Tensor:
    rel = Ra.transpose(-1, -2) @ Rb
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def _rot(aa: torch.Tensor) -> torch.Tensor:
    return batch_rodrigues(aa.reshape(-1, 3).double()).reshape(*aa.shape[:-1], 3, 3)


def face_vertices(head: HeadModel) -> np.ndarray:
    """Indices of the face region: skin in front of the ears, above the chin (no eyeballs, no neck)."""
    v = head.data.v_template
    masks = head.data.part_masks or {}
    keep = np.ones(len(v), bool)
    for name in ("left_eyeball", "right_eyeball", "neck", "scalp", "ears", "mouth_interior"):
        if name in masks:
            keep &= ~np.asarray(masks[name], bool)
    lm = (head.data.v_template[head.data.faces[head.data.lmk_faces]] * head.data.lmk_bary[:, :, None]).sum(1)
    lo = lm.min(0) - 0.01
    hi = lm.max(0) + 0.01
    keep &= (v[:, 0] > lo[0]) & (v[:, 0] < hi[0]) & (v[:, 1] > lo[1]) & (v[:, 1] < hi[1] + 0.02) & (v[:, 2] > lm[:, 2].min() - 0.02)
    return np.nonzero(keep)[0]


@torch.no_grad()
def compare_params(
    head: HeadModel,
    truth: FlameParams,
    true_cameras: Cameras,
    fitted: FlameParams,
    fitted_K: torch.Tensor,
    fitted_world_to_cam: torch.Tensor,
) -> dict[str, float]:
    """Errors of B fitted frames against the truth (both [B] frames; cameras [B, 1, ...] / [B, 3, 3] and [B, 4, 4])."""
    b = fitted.batch_size
    gt = head(truth)
    fit = head(fitted)
    uv_gt, _ = project(gt.landmarks, true_cameras)  # [B, 1, 68, 2]
    fit_cams = Cameras(K=fitted_K[:, None].float(), world_to_cam=fitted_world_to_cam[:, None].float(), width=true_cameras.width, height=true_cameras.height)
    uv_fit, _ = project(fit.landmarks, fit_cams)
    err = (uv_gt - uv_fit).norm(dim=-1)[:, 0]  # [B, 68]
    iod = (uv_gt[:, 0, 36] - uv_gt[:, 0, 45]).norm(dim=-1)

    def cam_head(p: FlameParams, w2c: torch.Tensor) -> torch.Tensor:
        return w2c[..., :3, :3].double() @ _rot(p.rotation) @ _rot(p.neck_pose)

    true_w2c = true_cameras.world_to_cam[:, 0]
    head_deg = _angle_deg(cam_head(truth, true_w2c), cam_head(fitted, fitted_world_to_cam))
    jaw_deg = _angle_deg(_rot(truth.jaw_pose), _rot(fitted.jaw_pose))
    gaze = 0.5 * (_angle_deg(_rot(truth.eyes_pose[:, :3]), _rot(fitted.eyes_pose[:, :3])) + _angle_deg(_rot(truth.eyes_pose[:, 3:]), _rot(fitted.eyes_pose[:, 3:])))

    def still(p: FlameParams, expr: torch.Tensor, jaw: torch.Tensor) -> torch.Tensor:
        q = head.neutral_params(b)
        q.shape = truth.shape
        q.expr = expr
        q.jaw_pose = jaw
        return head(q).vertices

    face = torch.as_tensor(face_vertices(head))
    v_true = still(truth, truth.conformed(head.n_shape, head.n_expr).expr, truth.jaw_pose)[:, face]
    v_fit = still(fitted, fitted.conformed(head.n_shape, head.n_expr).expr, fitted.jaw_pose)[:, face]
    expr_mm = (v_true - v_fit).norm(dim=-1).mean(-1) * 1000.0
    e_t = truth.conformed(head.n_shape, head.n_expr).expr
    e_f = fitted.conformed(head.n_shape, head.n_expr).expr
    return {
        "frames": float(b),
        "landmark_px": float(err.mean()),
        "landmark_iod_percent": float((err / iod[:, None]).mean() * 100.0),
        "landmark_iod_percent_max_frame": float((err / iod[:, None]).mean(-1).max() * 100.0),
        "head_rotation_deg": float(head_deg.mean()),
        "jaw_deg": float(jaw_deg.mean()),
        "gaze_deg": float(gaze.mean()),
        "expression_mm": float(expr_mm.mean()),
        "expression_coeff_rmse": float(((e_t - e_f) ** 2).mean().sqrt()),
        "true_jaw_deg": float(torch.rad2deg(truth.jaw_pose.norm(dim=-1)).mean()),
        "true_head_rotation_deg": float(torch.rad2deg(truth.rotation.norm(dim=-1)).mean()),
        "true_expression_mm": float((v_true - still(truth, torch.zeros_like(e_t), torch.zeros_like(truth.jaw_pose))[:, face]).norm(dim=-1).mean() * 1000.0),
    }


def mean_of(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: float(np.mean([r[k] for r in rows])) for k in keys if all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for r in rows)}


@torch.no_grad()
def exact_fit_input(head: HeadModel, truth: FlameParams, cameras: Cameras, points, sequence: bool = True):  # type: ignore[no-untyped-def]
    """A FitInput holding the true model points projected by the true cameras (ideal detections).

    ``points`` is the fitter's ``ModelPoints``: its landmarks and face oval built from its raw
    points after projection, as the fitter builds them. Tests the fitter alone, without the
    detector's errors.
    """
    from backend.tracking.fit import FitInput

    b = truth.batch_size
    verts = head(truth).vertices.numpy()
    pts = torch.as_tensor(points.evaluate(verts), dtype=torch.float32)
    raw = project(pts, cameras)[0][:, 0].double()
    uv = points.landmarks(raw).numpy()
    pairs = np.stack([np.arange(b - 1), np.arange(1, b)], 1) if sequence and b > 1 else np.zeros((0, 2), np.int64)
    return FitInput(
        targets=uv,
        oval=points.oval(raw).numpy(),
        iod=np.linalg.norm(uv[:, 36] - uv[:, 45], axis=-1),
        source=np.zeros(b, np.int64),
        image_size=np.tile([cameras.width, cameras.height], (b, 1)).astype(np.float64),
        focal_init=np.array([1.5 * max(cameras.width, cameras.height)]),
        sequence_pairs=pairs,
    )
