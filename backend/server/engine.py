"""Posing and rendering stored avatars on the service's device (only the worker thread calls it)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from backend.gaussians.avatar import SH_C0, Avatar, deform
from backend.gaussians.files import export_ply
from backend.gaussians.layout import Binding
from backend.gaussians.splats import Splats
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.head.registry import fingerprint, load_head_model
from backend.render.camera import Cameras
from backend.render.gsplat_backend import gsplat_available
from backend.render.frame_player import FramePlayer, PlayerConfig
from backend.server.store import Store
from backend.wire.protocol import ErrorCode, WireError

Arrays = dict[str, np.ndarray]
Lend = Callable[[list[int]], "list[np.ndarray] | None"]  # byte sizes -> byte arrays to fill, or None
if TYPE_CHECKING:
    from backend.generate.model import Generator

_TORCH_DTYPES = {"<f4": torch.float32, "<f2": torch.float16, "<u1": torch.uint8}


def _to_host(tensors: dict[str, torch.Tensor], lend: Lend | None) -> Arrays:
    """Host copies of ``tensors`` (each the dtype it travels as): into the byte arrays
    ``lend`` gives (a shared-memory slot) when it does, else into new ones."""
    into = lend([t.numel() * t.element_size() for t in tensors.values()]) if lend is not None else None
    if into is None:
        return {name: t.cpu().numpy() for name, t in tensors.items()}
    arrays = {}
    for (name, t), raw in zip(tensors.items(), into):
        host = torch.from_numpy(raw).view(t.dtype).view(t.shape)
        host.copy_(t)
        arrays[name] = host.numpy()
    return arrays


def _coverage(alpha: torch.Tensor) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the smallest window holding every pixel of ``alpha`` [H, W] above 0;
    (0, 0, 0, 0) for an empty frame. One small device-to-host copy."""
    rows, cols = (alpha > 0).any(dim=1).int(), (alpha > 0).any(dim=0).int()
    h, w = alpha.shape
    # The first covered row/column from either end; argmax finds the first 1.
    first_last = torch.stack([rows.max(), cols.argmax(), rows.argmax(), cols.flip(0).argmax(), rows.flip(0).argmax()])
    covered, x0, y0, x_end, y_end = first_last.tolist()
    if not covered:
        return 0, 0, 0, 0
    return x0, y0, w - x_end - x0, h - y_end - y0


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise WireError(ErrorCode.NOT_AVAILABLE, "--device cuda was asked for, but no CUDA device is available; use --device cpu")
    return name


class Engine:
    """The head model and a few recently used avatars, on one device."""

    def __init__(self, flame: str | None, device: str, store: Store, cache_size: int = 4, compile_player: bool = False) -> None:
        """``flame``: the head model as ``load_head_model`` takes it; ``device``: "cpu" or "cuda";
        ``compile_player``: see ``ServiceConfig``."""
        self.device = device
        self._player_config = PlayerConfig(depth=True, compile=compile_player)
        self.head: HeadModel = load_head_model(flame).to(device)
        self.fingerprint = fingerprint(self.head.data)
        self.store = store
        self._cache: OrderedDict[str, tuple[int, Avatar]] = OrderedDict()
        self._players: dict[str, tuple[Avatar, FramePlayer]] = {}  # for the cached avatars only
        self._cache_size = cache_size
        self._generator: Generator | None = None

    def describe(self) -> dict[str, str]:
        on_cuda = self.device.startswith("cuda")
        return {
            "device": self.device,
            "device_name": torch.cuda.get_device_name(0) if on_cuda else "cpu",
            "rasterizer": "gsplat (CUDA)" if on_cuda and gsplat_available() else "pure-torch reference (CPU)",
        }

    def check_fits(self, avatar: Avatar) -> None:
        if avatar.head_fingerprint != self.fingerprint:
            raise WireError(
                ErrorCode.INCOMPATIBLE,
                f"the avatar was made on head model '{avatar.head_name}' ({avatar.head_fingerprint}); this service runs "
                f"'{self.head.name}' ({self.fingerprint}); start the service with the same --flame model",
            )

    def avatar(self, aid: str) -> Avatar:
        """Avatar ``aid`` on the device, reloaded when the store has a newer version."""
        version = self.store.avatar_version(aid)
        cached = self._cache.get(aid)
        if cached is not None and cached[0] == version:
            self._cache.move_to_end(aid)
            return cached[1]
        avatar = self.store.load_avatar(aid)
        self.check_fits(avatar)
        avatar = avatar.to(self.device)
        self._cache[aid] = (version, avatar)
        while len(self._cache) > self._cache_size:
            self._players.pop(self._cache.popitem(last=False)[0], None)
        return avatar

    def player(self, aid: str) -> FramePlayer:
        """The frame player of avatar ``aid`` (its captured graphs live as long as the cached avatar)."""
        avatar = self.avatar(aid)
        kept = self._players.get(aid)
        if kept is None or kept[0] is not avatar:
            kept = self._players[aid] = (avatar, FramePlayer(avatar, self.head, torch.zeros(3), config=self._player_config))
        return kept[1]

    def generator(self, checkpoint: Path | None) -> Generator:
        """The stage-1 network of ``checkpoint`` on the device, loaded on first use."""
        if self._generator is None:
            from backend.generate.checkpoint import load_generator

            model, _ = load_generator(checkpoint, self.head)
            self._generator = model.to(self.device)
        return self._generator

    def conform(self, params: FlameParams) -> FlameParams:
        """``params`` padded or cut to the head's component counts, on the device."""
        return params.conformed(self.head.n_shape, self.head.n_expr).to(self.device)

    @torch.no_grad()
    def deform(self, aid: str, params: FlameParams, index: np.ndarray | None, chunk: int = 16) -> Iterator[tuple[Arrays, float]]:
        """Per frame: positions [M, 3] (metres), rotations [M, 4] (w, x, y, z), scales [M, 3] (metres)
        of the Gaussians ``index`` (all when None), and the milliseconds spent (the first frame
        also pays for looking up the avatar and preparing the parameters)."""
        t_setup = time.perf_counter()
        avatar = self.avatar(aid)
        if index is not None:  # pose only the subset: each Gaussian's pose depends on its own triangle alone
            sel = torch.from_numpy(index.astype(np.int64)).to(self.device)
            b = avatar.binding
            binding = Binding(b.face_idx[sel], b.bary[sel], b.texel[sel], b.resolution)
            avatar = replace(avatar, binding=binding, local=avatar.local.map(lambda t: t[sel]))
        params = avatar.params_for(self.conform(params))
        setup = time.perf_counter() - t_setup
        for _, splats, share in self._posed_frames(avatar, params, chunk):
            t1 = time.perf_counter()
            fields = (splats.means, splats.quats, splats.scales)
            out = {k: f.float().cpu().numpy() for k, f in zip(("positions", "rotations", "scales"), fields)}
            yield out, 1e3 * (setup + share + time.perf_counter() - t1)
            setup = 0.0

    def _posed_frames(self, avatar: Avatar, params: FlameParams, chunk: int) -> Iterator[tuple[int, Splats, float]]:
        """Frame index t, its posed Gaussians [N, ...], and its share (seconds) of posing its
        chunk: frames are posed ``chunk`` at a time, one batched call each."""
        for start in range(0, params.batch_size, chunk):
            t0 = time.perf_counter()
            idx = list(range(start, min(start + chunk, params.batch_size)))
            splats = deform(avatar, self.head, params.index(idx))
            share = (time.perf_counter() - t0) / len(idx)
            for i, t in enumerate(idx):
                yield t, splats.frame(i), share

    def statics(self, aid: str, index: np.ndarray | None) -> Arrays:
        """Pose-independent attributes: opacities [M] and base colours [M, 3] (linear RGB, SH band 0)."""
        local = self.avatar(aid).local
        opac = torch.sigmoid(local.opacity_logit)
        colors = (0.5 + SH_C0 * local.sh[:, 0]).clamp(0.0, 1.0)
        if index is not None:
            sel = torch.from_numpy(index.astype(np.int64)).to(self.device)
            opac, colors = opac[sel], colors[sel]
        return {"opacities": opac.float().cpu().numpy(), "colors": colors.float().cpu().numpy()}

    @torch.no_grad()
    def render(
        self,
        aid: str,
        params: FlameParams,
        cameras: Cameras,
        rgba_dtype: str,
        depth_dtype: str | None,
        background: tuple[float, float, float] | None,
        crop: bool = False,
        chunk: int = 8,
        lend: Lend | None = None,
    ) -> Iterator[tuple[Arrays, tuple[int, int, int, int] | None, float]]:
        """Per frame t (camera ``cameras.frame(t)``): rgba [H, W, 4] and depth [H, W] (metres,
        planar, 0 where empty), the window they cover, and the milliseconds spent. Without a
        background the RGB is premultiplied by alpha (composited over black). The first frame's
        milliseconds include looking up the avatar and preparing parameters and cameras.

        ``crop`` (no background): only the smallest window (x, y, w, h; pixels from the top-left)
        holding every pixel of non-zero alpha is copied out and returned; outside it the frame
        is empty (zero rgba and depth). Without ``crop`` the window is None (the whole frame).
        ``lend`` may give the host memory each frame is copied into (``SlotPool.reserve``)."""
        t_setup = time.perf_counter()
        player = self.player(aid)
        # The player poses without checks (they sync with the device); the parameters arrive on the host.
        params.validate()
        params.check_head(self.head.name, self.head.expr_names)
        params = self.conform(params)
        cams = cameras.to(self.device)
        bg = torch.tensor(background or (0.0, 0.0, 0.0), device=self.device)
        setup = time.perf_counter() - t_setup
        for start in range(0, params.batch_size, chunk):
            t0 = time.perf_counter()
            idx = list(range(start, min(start + chunk, params.batch_size)))
            # One graph replay poses and renders the chunk; its buffers are read before the next.
            out = player(params.index(idx), cams.frames(idx), bg)
            share = (time.perf_counter() - t0) / len(idx)
            for i in range(len(idx)):
                t1 = time.perf_counter()
                rgba = torch.cat([out.rgb[i, 0], out.alpha[i, 0]], dim=-1)
                depth = out.depth[i, 0, ..., 0]
                window = _coverage(out.alpha[i, 0, ..., 0]) if crop else None
                if window is not None:
                    x, y, w, h = window
                    rgba, depth = rgba[y : y + h, x : x + w], depth[y : y + h, x : x + w]
                if rgba_dtype == "<u1":
                    rgba = (rgba.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
                tensors = {"rgba": rgba.to(_TORCH_DTYPES[rgba_dtype])}
                if depth_dtype is not None:
                    tensors["depth"] = depth.to(_TORCH_DTYPES[depth_dtype])
                arrays = _to_host(tensors, lend)
                yield arrays, window, 1e3 * (setup + share + time.perf_counter() - t1)
                setup = 0.0

    @torch.no_grad()
    def ply(self, aid: str, params: FlameParams) -> bytes:
        """A standard 3DGS .ply of the avatar posed by one frame of ``params``."""
        avatar = self.avatar(aid)
        splats = deform(avatar, self.head, avatar.params_for(self.conform(params))).frame(0)
        cpu = type(splats)(
            **{k: getattr(splats, k).cpu() for k in ("means", "quats", "scales", "opacities", "colors")}, sh_degree=splats.sh_degree
        )
        path = self.store.scratch(".ply")
        try:
            export_ply(cpu, avatar.local.sh.cpu(), path)
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
