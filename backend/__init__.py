"""SpatialAvatar backend: FLAME-bound 3D Gaussian heads (torch, gsplat; CUDA or CPU)."""

__version__ = "0.1.0"
