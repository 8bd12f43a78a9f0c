"""Mesh-bound Gaussians: layouts, triangle frames, deformation, avatar files."""
