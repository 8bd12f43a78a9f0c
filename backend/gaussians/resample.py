"""An avatar carried onto a layout of another Gaussian count over the same UV map.

Every local parameter is read as a UV image (``uv_image.py``) and sampled at the new
layout's texels, so a denser layout takes the coarse one's shape and colours, smoothly
interpolated, and then has room for detail (the generator's 32,768 Gaussians as the start
of a 100,000-Gaussian refinement). Log-scales are carried as residuals over each layout's
own surface initialization: a Gaussian of a layout twice as dense starts half as wide, as
the surface start would. The head's per-vertex ``static_offset`` (the generator's hair lift)
does not depend on the layout and is kept as it is.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from backend.gaussians.avatar import Avatar, LocalGaussians
from backend.gaussians.layout import sample_layout
from backend.gaussians.surface import SurfaceInit, surface_local
from backend.gaussians.uv_image import filled_uv_image, read_at_texels
from backend.head.model import HeadModel


def resample_avatar(avatar: Avatar, head: HeadModel, count: int, init: SurfaceInit = SurfaceInit()) -> Avatar:
    """``avatar`` on the layout of ``count`` Gaussians of ``head``'s UV map (``sample_layout``).

    ``init``: the surface initialization whose log-scales both layouts' are measured against
    (only their ratio matters, set by the two layouts' texel spacing). The same count
    returns the avatar's parameters unchanged. Local parameters come back on the CPU.
    """
    if count == avatar.count:
        return avatar
    head = HeadModel(head.data)  # a CPU copy: the layouts' surface scales are computed once, on the template
    source = avatar.binding.to("cpu")
    target = sample_layout(head.data.uv_coords, head.data.uv_faces, count)
    shape = avatar.shape.detach().cpu()
    base_source, base_target = (surface_local(head, shape, b, torch.full((b.count, 3), 0.5), init).log_scale for b in (source, target))
    local = avatar.local.map(lambda t: t.detach().cpu().float())
    n = local.count
    columns = {
        "offset": local.offset,
        # q and -q are one rotation: one sign for all, so neighbours average as rotations.
        "rotation": torch.where(local.rotation[:, :1] < 0, -local.rotation, local.rotation),
        "log_scale": local.log_scale - base_source,
        "opacity_logit": local.opacity_logit[:, None],
        "sh": local.sh.reshape(n, -1),
    }
    widths = [v.shape[1] for v in columns.values()]
    image = filled_uv_image(torch.cat(list(columns.values()), dim=1), source)
    values = dict(zip(columns, read_at_texels(image, target).split(widths, dim=1)))
    resampled = LocalGaussians(
        offset=values["offset"],
        rotation=F.normalize(values["rotation"], dim=-1),
        log_scale=values["log_scale"] + base_target,
        opacity_logit=values["opacity_logit"][:, 0],
        sh=values["sh"].reshape(count, *local.sh.shape[1:]),
    )
    resampled.validate(count)
    return replace(avatar, binding=target, local=resampled, meta=dict(avatar.meta) | {"resampled_from": n})
