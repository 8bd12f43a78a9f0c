"""Named vertex masks of the built-in head (``HeadModelData.part_masks``).

They drive procedural albedo (hair cap, brows, lips, eyes, mouth) and region-specific
losses. Masks are computed on the neutral template from the same analytic shape that
made it, so they line up with the features.
"""

from __future__ import annotations

import numpy as np

from backend.head.builtin.features import FaceShape
from backend.head.builtin.fields import vertex_facts
from backend.head.builtin.mesh import HeadMesh
from backend.head.builtin.spec import HeadSpec

# Hairline height (metres) against the azimuth around the vertical axis (degrees from the
# front, toward the subject's left); mirrored for the right side.
_HAIRLINE = np.array(
    [
        (0.0, 0.074),
        (30.0, 0.068),
        (55.0, 0.050),
        (72.0, 0.034),
        (80.0, 0.004),  # sideburn in front of the ear
        (88.0, 0.006),
        (95.0, 0.032),  # over the ear
        (118.0, 0.032),
        (135.0, -0.010),  # behind the ear
        (155.0, -0.050),
        (180.0, -0.066),  # nape
    ]
)


def part_masks(spec: HeadSpec, shape: FaceShape, mesh: HeadMesh) -> dict[str, np.ndarray]:
    """Masks [V] bool: eyeballs, mouth interior, scalp, brows, lips, nose, ears, eyelids, neck, skin."""
    facts = vertex_facts(mesh)
    v = facts.p
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    skin = facts.skin
    masks: dict[str, np.ndarray] = {}
    for name, (a, b) in zip(("left_eyeball", "right_eyeball"), mesh.eyes):
        m = np.zeros(len(v), bool)
        m[a:b] = True
        masks[name] = m
    masks["mouth_interior"] = facts.pocket.copy()

    azimuth = np.degrees(np.abs(np.arctan2(x, z + 0.01)))
    masks["scalp"] = skin & (y > np.interp(azimuth, _HAIRLINE[:, 0], _HAIRLINE[:, 1]))

    front = skin & (z > 0.03)
    brow = shape.brow_line(x)
    ax = np.abs(x)
    masks["brows"] = front & (np.abs(y - (brow + 0.001 - 0.004 * ((ax - 0.012) / 0.045) ** 2)) < 0.0045) & (ax > 0.011) & (ax < 0.056)

    ym = spec.stomion[0]
    upper_h, lower_h = shape.lip_heights(x)
    in_mouth = ax <= spec.mouth_half_width + 1e-6
    lip_band = front & in_mouth & (z > spec.stomion[1] - 0.02)
    # A grid row runs along each vermilion border, so a small tolerance keeps the border row.
    masks["upper_lip"] = lip_band & (facts.lip_side > 0) & (y >= ym - 1e-6) & (y <= ym + upper_h + 3e-4)
    masks["lower_lip"] = lip_band & (facts.lip_side < 0) & (y <= ym + 1e-6) & (y >= ym - lower_h - 3e-4)

    relief = shape.face_depth(x, y) - shape.face_depth(x, y, nose=False)
    masks["nose"] = front & (relief > 0.0015) & (y < spec.eye_centre[1] + 0.012)
    masks["ears"] = skin & (shape.ear_relief(v) > 0.0008) & (ax > 0.05)
    masks["scalp"] &= ~masks["ears"]

    lids = np.zeros(len(v), bool)
    for centre in mesh.eye_centres:
        d = np.linalg.norm(v - centre, axis=1)
        lids |= skin & (d < spec.eye_radius + spec.lid_gap + 0.0025) & (z > centre[2])
    masks["eyelids"] = lids

    # Below the mandible line (gonion to menton) or low on the neck, or the nape.
    gy, gz, my, mz = -0.085, -0.004, -0.121, 0.078
    below = ((z - gz) * (my - gy) - (y - gy) * (mz - gz)) / np.hypot(my - gy, mz - gz)
    masks["neck"] = skin & ((below > 0.004) | (y < -0.13)) & ~masks["scalp"]
    masks["skin"] = skin.copy()
    return masks
