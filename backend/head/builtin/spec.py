"""Every number that sets the built-in head's resolution and proportions, in one place.

Positions are in metres in FLAME's frame (+x subject's left, +y up, +z forward); the origin
sits between the ears a little below eye height. Left/right features are given for the
subject's left side (+x) and mirrored.
"""

from __future__ import annotations

from dataclasses import dataclass

Vec2 = tuple[float, float]
Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class HeadSpec:
    """Resolution and proportions of the generated head (see docs/head.md)."""

    # -- resolution -------------------------------------------------------------------------
    columns: int = 112  # grid vertices around the head (per row)
    rows: int = 76  # grid rows from below the crown pole to the bottom of the neck
    eye_rings: int = 13  # latitude rings of each eyeball, poles excluded
    eye_segments: int = 22  # longitude segments of each eyeball
    mouth_rings: int = 6  # rings of the mouth pocket behind the lip slit

    # -- ray-cast centre and extent ------------------------------------------------------------
    centre: Vec3 = (0.0, -0.012, -0.012)  # every surface ray starts here
    theta_max_deg: float = 163.0  # polar angle (from +y) of the neck's bottom row

    # -- cranium (an egg: a different semi-axis on each side of its centre) -------------------
    cranium_centre: Vec3 = (0.0, 0.014, -0.009)
    cranium_x: float = 0.0745
    cranium_up: float = 0.104
    cranium_down: float = 0.09
    cranium_back: float = 0.097
    cranium_front: float = 0.100
    cranium_power: float = 2.5  # exponent across the vault (2 = ellipse)

    # -- lower face / jaw block (superellipsoid) ----------------------------------------------
    jaw_centre: Vec3 = (0.0, -0.048, 0.012)
    jaw_axes: Vec3 = (0.064, 0.072, 0.072)
    jaw_power: float = 2.6  # > 2 squares off the jaw angle

    # -- neck (elliptic cylinder, slightly tilted forward at the top) ------------------------
    neck_centre_z: float = -0.018
    neck_axes: Vec2 = (0.053, 0.058)
    neck_top: float = 0.0

    # -- face --------------------------------------------------------------------------------
    eye_centre: Vec3 = (0.032, 0.002, 0.066)  # left eyeball centre; right is mirrored
    eye_radius: float = 0.0122
    lid_gap: float = 0.0012  # lid skin to eyeball distance
    lid_margin_gap: float = 0.0003  # lid edge to eyeball distance
    eye_corners: Vec2 = (0.0175, 0.0465)  # x of the inner and outer canthus
    lid_slit_drop: float = 0.002  # closed-lid line below the eyeball centre
    eye_canthal_tilt: float = 0.0015  # outer corner above the inner corner
    lid_open_up: float = 0.0062  # upper margin above the slit at its highest
    lid_open_down: float = 0.0032  # lower margin below the slit at its lowest
    nose_tip_y: float = -0.031  # height of the pronasale (its depth is in the nose ridge table)
    stomion: Vec2 = (-0.067, 0.101)  # (y, z) where the lips meet
    mouth_half_width: float = 0.0245
    chin_y: float = -0.104  # height of the chin's most forward point

    # -- ears --------------------------------------------------------------------------------
    ear_centre: Vec3 = (0.072, -0.004, -0.018)  # on the skull surface, centre of the pinna
    ear_height: float = 0.062
    ear_width: float = 0.032
    ear_tilt_deg: float = 16.0  # long axis leans back from vertical
    ear_flare: float = 0.015  # how far the back rim stands off the skull

    # -- mouth pocket ------------------------------------------------------------------------
    mouth_depth: float = 0.042
    mouth_height: float = 0.026

    # -- rig ---------------------------------------------------------------------------------
    jaw_joint: Vec2 = (-0.024, 0.006)  # (y, z) on the midline
    neck_joint: Vec2 = (-0.06, -0.026)
    root_joint: Vec2 = (-0.12, -0.03)

    # -- bases -------------------------------------------------------------------------------
    n_shape: int = 100
    n_expr: int = 50
    identity_columns: int = 300
    expression_columns: int = 100
    seed: int = 20240611


SPEC = HeadSpec()
