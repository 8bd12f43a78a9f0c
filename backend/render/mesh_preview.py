"""A small software renderer for triangle meshes: previews, figures and fitted-mesh overlays.

Cameras follow OpenCV: ``world_to_cam`` maps world points to a camera frame with x right,
y down and z forward; ``K`` is the usual 3x3 pinhole matrix in pixels. Triangles are
rasterised with a z-buffer, vectorised over triangles (bucketed by screen size and chunked),
and shaded with Lambert + ambient light from per-pixel interpolated vertex normals.
"""

from __future__ import annotations

import numpy as np

# Fragments created per chunk; bounds memory to a few hundred MB whatever the mesh.
_FRAGMENTS_PER_CHUNK = 4_000_000


def look_at(eye: np.ndarray, target: np.ndarray, up: tuple[float, float, float] = (0.0, 1.0, 0.0)) -> np.ndarray:
    """[4, 4] OpenCV world-to-camera matrix of a camera at ``eye`` looking at ``target`` (world +y up)."""
    eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    m = np.eye(4)
    m[:3, :3] = np.stack([x, y, z])
    m[:3, 3] = -m[:3, :3] @ eye
    return m


def intrinsics(fov_y_deg: float, width: int, height: int) -> np.ndarray:
    """[3, 3] pinhole matrix with square pixels and the principal point at the image centre."""
    f = 0.5 * height / np.tan(np.radians(fov_y_deg) / 2)
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float64)


def project(points: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray) -> np.ndarray:
    """[N, 3] world points -> [N, 3] (pixel x, pixel y, camera depth)."""
    cam = np.asarray(points, np.float64) @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    z = cam[:, 2:3]
    uv = (cam[:, :2] / np.where(np.abs(z) < 1e-9, 1e-9, z)) @ K[:2, :2].T + K[:2, 2]
    return np.concatenate([uv, z], axis=1)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[V, 3] unit vertex normals, faces weighted by their corner angle (insensitive to how a
    surface is split into triangles); zero for unreferenced vertices."""
    v = np.asarray(vertices, np.float64)
    tri = v[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-30)
    n = np.zeros_like(v)
    for k in range(3):
        a = tri[:, (k + 1) % 3] - tri[:, k]
        b = tri[:, (k + 2) % 3] - tri[:, k]
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        np.add.at(n, faces[:, k], fn * np.arccos(np.clip(cos, -1.0, 1.0))[:, None])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _fragments(scr: np.ndarray, faces: np.ndarray, width: int, height: int) -> tuple[np.ndarray, ...]:
    """All (pixel, face, screen-space barycentrics) with the pixel centre inside the face.

    scr: [V, 3] (x, y, depth) per vertex. Returns pixel index [N], face index [N], bary [N, 3].
    """
    tri = scr[faces]  # [F, 3, 3]
    visible = (tri[:, :, 2] > 1e-6).all(axis=1)
    lo = np.floor(tri[:, :, :2].min(axis=1) - 0.5).astype(np.int64) + 1
    hi = np.floor(tri[:, :, :2].max(axis=1) - 0.5).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    size = hi - lo + 1
    visible &= (size > 0).all(axis=1)
    ids = np.nonzero(visible)[0]
    span = size[ids].max(axis=1)
    out_pix, out_face, out_bary = [], [], []
    # Bucket by the next power of two of the screen span so each chunk uses one small pixel block.
    bucket = np.ceil(np.log2(np.maximum(span, 1))).astype(np.int64)
    for b in np.unique(bucket):
        members = ids[bucket == b]
        s = 1 << int(b)
        per = max(1, _FRAGMENTS_PER_CHUNK // (s * s))
        oy, ox = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
        ox, oy = ox.ravel(), oy.ravel()
        for start in range(0, len(members), per):
            f = members[start : start + per]
            px = lo[f, 0, None] + ox[None]  # [n, s*s]
            py = lo[f, 1, None] + oy[None]
            inside_box = (px <= hi[f, 0, None]) & (py <= hi[f, 1, None])
            t = tri[f]
            x0, y0 = t[:, 0, 0:1], t[:, 0, 1:2]
            x1, y1 = t[:, 1, 0:1], t[:, 1, 1:2]
            x2, y2 = t[:, 2, 0:1], t[:, 2, 1:2]
            area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
            ok = np.abs(area) > 1e-12
            area = np.where(ok, area, 1.0)
            cx, cy = px + 0.5, py + 0.5
            w0 = ((x1 - cx) * (y2 - cy) - (x2 - cx) * (y1 - cy)) / area
            w1 = ((x2 - cx) * (y0 - cy) - (x0 - cx) * (y2 - cy)) / area
            w2 = 1.0 - w0 - w1
            inside = inside_box & ok & (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
            r, c = np.nonzero(inside)
            out_pix.append(py[r, c] * width + px[r, c])
            out_face.append(f[r])
            out_bary.append(np.stack([w0[r, c], w1[r, c], w2[r, c]], axis=1))
    if not out_pix:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3))
    return np.concatenate(out_pix), np.concatenate(out_face), np.concatenate(out_bary)


def rasterize(
    vertices: np.ndarray, faces: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffered visibility: [H, W] face index (-1 where empty) and [H, W, 3] perspective-correct barycentrics."""
    faces = np.asarray(faces, np.int64)
    scr = project(vertices, K, world_to_cam)
    pix, face, bary = _fragments(scr, faces, width, height)
    face_idx = np.full(width * height, -1, np.int64)
    bary_img = np.zeros((width * height, 3))
    if len(pix):
        # Perspective-correct weights: screen-space barycentrics divided by vertex depth.
        inv_z = 1.0 / scr[faces[face], 2]
        w = bary * inv_z
        depth = 1.0 / w.sum(axis=1)
        order = np.lexsort((depth, pix))
        pix, face, w, depth = pix[order], face[order], w[order], depth[order]
        first = np.ones(len(pix), bool)
        first[1:] = pix[1:] != pix[:-1]
        pix, face, w, depth = pix[first], face[first], w[first], depth[first]
        face_idx[pix] = face
        bary_img[pix] = w * depth[:, None]
    return face_idx.reshape(height, width), bary_img.reshape(height, width, 3)


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    K: np.ndarray,
    world_to_cam: np.ndarray,
    width: int,
    height: int,
    vertex_colors: np.ndarray | None = None,
    *,
    wireframe: tuple[float, float, float] | None = None,
    wire_px: float = 0.6,
    points: np.ndarray | None = None,
    point_color: tuple[float, float, float] = (1.0, 0.15, 0.1),
    point_radius: float = 2.5,
    background: np.ndarray | tuple[float, float, float] = (1.0, 1.0, 1.0),
    light_dir: tuple[float, float, float] = (-0.3, 0.45, 1.0),
    ambient: float = 0.3,
) -> np.ndarray:
    """Shaded image of a mesh -> uint8 [H, W, 3].

    Args:
        vertices: [V, 3] world positions. faces: [F, 3] vertex indices.
        K: [3, 3] intrinsics in pixels. world_to_cam: [4, 4] OpenCV extrinsics.
        vertex_colors: optional [V, 3] albedo in [0, 1]; light grey when omitted.
        wireframe: RGB of triangle edges drawn over visible faces, or None.
        wire_px: half width of wireframe lines in pixels.
        points: optional [N, 2] pixel positions drawn as dots on top (e.g. landmarks).
        background: RGB in [0, 1], or an [H, W, 3] float image (an overlay on a photo).
        light_dir: direction the light travels in, in the camera frame.
        ambient: fraction of light that does not depend on the normal.
    """
    v = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    face_idx, bary = rasterize(v, faces, K, world_to_cam, width, height)
    bg = np.asarray(background, np.float64)
    img = np.broadcast_to(bg, (height, width, 3)).copy() if bg.ndim == 1 else bg.copy()
    hit = face_idx >= 0
    f = face_idx[hit]
    b = bary[hit]
    corners = faces[f]  # [N, 3]
    normals_cam = vertex_normals(v, faces) @ world_to_cam[:3, :3].T
    n = (normals_cam[corners] * b[..., None]).sum(axis=1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    cam_pts = (v[corners] * b[..., None]).sum(axis=1) @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    # Two-sided lighting: a face seen from behind (mouth interior, lid edges) is lit like its front.
    flip = (n * cam_pts).sum(axis=1) > 0
    n[flip] *= -1
    light = -np.asarray(light_dir, np.float64)
    light /= np.linalg.norm(light)
    shade = ambient + (1 - ambient) * np.clip(n @ light, 0, None)
    albedo = (
        np.full((len(f), 3), 0.78) if vertex_colors is None else (np.asarray(vertex_colors, np.float64)[corners] * b[..., None]).sum(axis=1)
    )
    img[hit] = albedo * shade[:, None]
    if wireframe is not None and hit.any():
        img[hit] = _wire(img[hit], project(v, K, world_to_cam)[corners][..., :2], b, wireframe, wire_px)
    if points is not None:
        _dots(img, np.asarray(points, np.float64), point_color, point_radius)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _wire(colour: np.ndarray, tri2d: np.ndarray, bary: np.ndarray, rgb: tuple[float, float, float], half_px: float) -> np.ndarray:
    """Blend ``rgb`` where the pixel lies within ``half_px`` of an edge of its own triangle."""
    e = [tri2d[:, (k + 2) % 3] - tri2d[:, (k + 1) % 3] for k in range(3)]  # edge opposite corner k
    area2 = np.abs(e[0][:, 0] * e[1][:, 1] - e[0][:, 1] * e[1][:, 0])
    # Pixel distance to edge k is bary_k times the triangle height over that edge.
    dist = np.stack([bary[:, k] * area2 / np.maximum(np.linalg.norm(e[k], axis=1), 1e-9) for k in range(3)], axis=1).min(axis=1)
    alpha = np.clip(1.0 - (dist - half_px), 0, 1)[:, None] * 0.8
    return colour * (1 - alpha) + np.asarray(rgb) * alpha


def _dots(img: np.ndarray, pts: np.ndarray, rgb: tuple[float, float, float], radius: float) -> None:
    """Paint filled discs of ``radius`` pixels centred on [N, 2] pixel positions, in place."""
    h, w = img.shape[:2]
    r = int(np.ceil(radius))
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    disc = ox**2 + oy**2 <= radius**2
    centre = np.floor(pts).astype(np.int64)
    px = (centre[:, 0, None] + ox[disc][None]).ravel()
    py = (centre[:, 1, None] + oy[disc][None]).ravel()
    ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    img[py[ok], px[ok]] = rgb
