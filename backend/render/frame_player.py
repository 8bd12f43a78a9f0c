"""Posing and rendering one avatar, replayed from a captured CUDA graph.

An animation renders the same avatar again and again; only the FLAME parameters and the
cameras change. Run eagerly, each frame launches a few hundred small kernels from Python
(posing the head, triangle frames, placement, projection, tile lists, rasterization), and
for one frame at a time those launches, not the GPU, set the pace. A player captures the
whole path once per batch size and image size and replays it: per call the host copies
parameters and cameras into the capture's input buffers and launches one graph.

Nothing in the captured path may wait for the GPU, so renders go through a ``TileBudget``
(fixed-size tile lists). Each call reads back how many intersections its frames needed; a
call that needed more than the budget held is rendered again after the budget grows and
the graph is captured anew, so no frame is ever returned with dropped intersections.
Without CUDA (or gsplat) the player runs the same functions eagerly.

Inside a graph the GPU still runs every small kernel of posing and placement (about two
hundred for one frame), each costing a few microseconds however little it does. With
``PlayerConfig.compile`` torch.compile fuses them into a handful of generated kernels; the
compilation (once per batch size, then cached on disk) is the price.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from backend.gaussians.avatar import Avatar, appearance, deform_geometry
from backend.gaussians.splats import Splats
from backend.head.model import HeadModel
from backend.head.params import POSE_FIELDS, FlameParams
from backend.render.cuda_graph import GraphedStep
from backend.render.camera import Cameras
from backend.render.gsplat_backend import gsplat_available
from backend.render.rasterize import RenderOutput, render
from backend.render.settings import RasterSettings
from backend.render.tile_intersect import TileBudget


@dataclass(frozen=True)
class PlayerConfig:
    """How a player renders.

    Attributes:
        depth: also render planar depth (a fourth rasterized channel).
        headroom: the tile budget holds this many times the most intersections seen, so
            frames that turn or come closer rarely force a new capture.
        warmup: eager calls (on a side stream) before a batch shape is captured.
        graph: capture on CUDA; False runs every call eagerly (the reference path).
        max_captures: batch shapes kept captured (each holds its own GPU memory); the
            least recently used one is dropped beyond this (a viewport resized many times).
        compile: fuse posing and placement with torch.compile (graphed players only). The
            first call of each batch size then compiles: seconds to tens of seconds, less
            when the disk cache of an earlier process holds the kernels.
    """

    depth: bool = False
    headroom: float = 1.5
    warmup: int = 1
    graph: bool = True
    max_captures: int = 4
    compile: bool = False


_FRAME_FIELDS = ("expr", *POSE_FIELDS)


class _Capture:
    """One batch shape's input buffers, tile budget and graph."""

    def __init__(self, player: FramePlayer, params: FlameParams, cameras: Cameras, budget: TileBudget) -> None:
        self.params = params.detach_clone()
        self.K = cameras.K.clone()
        self.world_to_cam = cameras.world_to_cam.clone()
        self.size = (cameras.width, cameras.height)
        self.budget = budget
        self.step = GraphedStep(lambda: player._render(self.params, self._cameras(), self.budget), (), warmup=player.config.warmup)

    def _cameras(self) -> Cameras:
        return Cameras(self.K, self.world_to_cam, *self.size)

    def load(self, params: FlameParams, cameras: Cameras) -> None:
        for name in _FRAME_FIELDS:
            getattr(self.params, name).copy_(getattr(params, name), non_blocking=True)
        self.K.copy_(cameras.K, non_blocking=True)
        self.world_to_cam.copy_(cameras.world_to_cam, non_blocking=True)


class FramePlayer:
    """Renders ``avatar`` on ``head`` for batches of B frames; one graph per (B, C, W, H).

    Args:
        avatar, head: on the device the player renders on (same for both).
        background: [3] RGB in [0, 1].
        settings: rasterizer constants.
        config: see ``PlayerConfig``.
    """

    def __init__(
        self,
        avatar: Avatar,
        head: HeadModel,
        background: torch.Tensor,
        settings: RasterSettings = RasterSettings(),
        config: PlayerConfig = PlayerConfig(),
    ) -> None:
        self.avatar, self.head, self.settings, self.config = avatar, head, settings, config
        self.device = avatar.local.offset.device
        self.background = background.to(self.device, torch.float32).clone()  # its own buffer, refilled in place
        self.graphed = config.graph and self.device.type == "cuda" and gsplat_available()
        self._appearance = appearance(avatar.local)  # the same for every frame
        self._pose = torch.compile(self._pose_eager, fullgraph=True, dynamic=False) if config.compile and self.graphed else self._pose_eager
        self._captures: OrderedDict[tuple[int, ...], _Capture] = OrderedDict()
        self.recaptures = 0  # graphs captured again after a frame outgrew its tile budget

    @property
    def captures(self) -> int:
        """How many graphs have been captured (a new one per batch shape and per budget growth)."""
        return sum(1 for c in self._captures.values() if c.step.captured)

    @torch.no_grad()
    def __call__(self, params: FlameParams, cameras: Cameras, background: torch.Tensor | None = None) -> RenderOutput:
        """Pose and render B frames.

        Args:
            params: B frames on the head's model (the avatar's identity is used).
            cameras: [B, C] cameras, or one [C] rig for every frame.
            background: [3] RGB in [0, 1] for this and later calls (None: keep the last).
        Returns:
            RenderOutput with [B, C, H, W, k] tensors. Graphed, they are the capture's own
            buffers: read or copy them before the next call.
        """
        params = self.avatar.params_for(params.to(self.device)).conformed(self.head.n_shape, self.head.n_expr)
        b = params.batch_size
        cams = cameras.to(self.device)
        cams = cams if cams.batched else cams.expand(b)
        if cams.K.shape[0] != b:
            raise ValueError(f"{b} frames of parameters but cameras for {cams.K.shape[0]}")
        if background is not None:
            self.background.copy_(background)  # in place: captured graphs read this buffer
        if not self.graphed:
            return self._render(params, cams, None)
        key = (b, cams.count, cams.width, cams.height)
        capture = self._captures.get(key)
        if capture is None:
            capture = self._captures[key] = _Capture(self, params, cams, self._probe_budget(params, cams))
            while len(self._captures) > self.config.max_captures:
                self._captures.popitem(last=False)
        self._captures.move_to_end(key)
        capture.load(params, cams)
        while True:
            out = capture.step()
            if not capture.budget.grow(self.config.headroom):  # the one sync of a call: the frames are read next anyway
                return out
            capture.step.recapture()
            self.recaptures += 1

    def _pose_eager(self, params: FlameParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Means, quats and scales, [B, N, 3 | 4 | 3], of the avatar posed by ``params``."""
        vertices = self.head(params, check=False).vertices
        b, local = self.avatar.binding, self.avatar.local
        return deform_geometry(vertices, self.head.faces, b.face_idx, b.bary, local.offset, local.rotation, local.log_scale)

    def _render(self, params: FlameParams, cameras: Cameras, budget: TileBudget | None) -> RenderOutput:
        splats = Splats(*self._pose(params), *self._appearance)
        return render(splats, cameras, self.background, settings=self.settings, budget=budget, depth=self.config.depth)

    def _probe_budget(self, params: FlameParams, cameras: Cameras) -> TileBudget:
        """A budget sized from the first batch's own intersections."""
        probe = TileBudget.probe(self.device)
        self._render(params, cameras, probe)
        return probe.sized(self.config.headroom)
