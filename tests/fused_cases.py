"""Checks of the Triton kernels in backend/refine/fused against the torch functions they
replace, on a device given by name: "cuda" runs them compiled; "cpu" runs them in Triton's
interpreter (the caller sets TRITON_INTERPRET=1 before Triton is imported)."""

from __future__ import annotations

import torch

from backend.gaussians.avatar import assemble_splats, place_gaussians
from backend.gaussians.frames import TriangleFrames, triangle_frames
from backend.head.registry import load_head_model
from backend.refine.losses import photometric_loss
from backend.refine.packed import PackLayout, unpack
from backend.refine.regularizers import AntiSpike, SurfaceHinge, depth_loss, spike_loss


def check_photometric(device: str) -> None:
    """Loss and gradient of the fused (1 - w) L1 + w D-SSIM equal torch's, on image sizes that
    are not multiples of the kernel's tile, for a batch of two, with an upstream gradient."""
    from backend.refine.fused.photometric import photometric_loss as fused_loss

    g = torch.Generator().manual_seed(0)
    for shape, weight in (((1, 37, 45, 3), 0.2), ((2, 20, 70, 3), 0.8)):
        rendered = torch.rand(shape, generator=g)
        target = (rendered + 0.3 * torch.randn(shape, generator=g)).clamp(0, 1)
        rendered[0, :4, :4] = target[0, :4, :4]  # where L1's gradient is 0
        ours, ref = (rendered.clone().to(device).requires_grad_(True) for _ in range(2))
        loss, expected = fused_loss(ours, target.to(device), weight), photometric_loss(ref, target.to(device), weight)
        (1.7 * loss).backward()
        (1.7 * expected).backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
        assert ours.grad is not None and ref.grad is not None
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-9)


def check_placement(device: str) -> None:
    """World Gaussians, hinge loss and the packed gradient of the fused placement equal those
    of place_gaussians + assemble_splats + spike_loss + depth_loss, for two step frames, with
    every hinge active on some Gaussians and a weighted sum of all outputs as the loss."""
    from backend.refine.fused.placement import place_with_hinges

    head = load_head_model("builtin").to(device)
    g = torch.Generator().manual_seed(0)
    frames_count, n = 3, 500
    verts = (head.v_template.cpu()[None].repeat(frames_count, 1, 1) + 0.01 * torch.randn(frames_count, head.v_template.shape[0], 3, generator=g)).to(device)
    frames = triangle_frames(verts, head.faces)
    face_idx = torch.randint(head.faces.shape[0], (n,), generator=g).to(device)
    bary = torch.rand(n, 3, generator=g)
    bary = (bary / bary.sum(1, keepdim=True)).to(device)
    packed = torch.cat(
        [
            0.8 * torch.randn(n, 3, generator=g),
            torch.randn(n, 4, generator=g),
            torch.randn(n, 3, generator=g) - 1.0,
            torch.randn(n, 1, generator=g),
            2.0 * torch.randn(n, 3, generator=g),  # some colours below 0, clamped
        ],
        dim=1,
    ).to(device)
    layout = PackLayout(1)
    spike, surface = AntiSpike(max_scale=0.6, max_ratio=3.0), SurfaceHinge(weight=10.0, max_depth=0.3)
    frame = torch.tensor([2, 0], device=device)
    weights = [torch.randn(2, n, 3, generator=g), torch.randn(2, n, 4, generator=g), torch.randn(2, n, 3, generator=g), torch.randn(n, generator=g), torch.randn(n, 3, generator=g)]
    weights = [w.to(device) for w in weights]

    def reference(p: torch.Tensor, v: torch.Tensor, fr: TriangleFrames) -> tuple[list[torch.Tensor], torch.Tensor]:
        local = unpack(p, layout)
        tri = TriangleFrames(*(t.index_select(0, frame) for t in fr))
        splats = assemble_splats(*place_gaussians(v.index_select(0, frame), head.faces, tri, face_idx, bary, local.offset, local.rotation, local.log_scale), local)
        hinges = spike_loss(local.log_scale, local.offset, spike) + depth_loss(local.rotation, local.log_scale, local.offset, surface)
        return [splats.means, splats.quats, splats.scales, splats.opacities, splats.colors], hinges

    def fused(p: torch.Tensor, v: torch.Tensor, fr: TriangleFrames) -> tuple[list[torch.Tensor], torch.Tensor]:
        splats, hinges = place_with_hinges(p, layout, frame, v, head.faces, fr, face_idx, bary, spike, surface)
        return [splats.means, splats.quats, splats.scales, splats.opacities, splats.colors], hinges

    # Fixed FLAME: the gradient reaches the packed parameters only. Fine-tuned FLAME: the
    # vertices and frames too (leaves here, so each field is compared on its own).
    for mesh_grad in (False, True):
        leaves = []
        for run in (fused, reference):
            p = packed.clone().requires_grad_(True)
            v, fr = verts.clone().requires_grad_(mesh_grad), TriangleFrames(*(t.clone().requires_grad_(mesh_grad) for t in frames))
            outputs, h = run(p, v, fr)
            leaves.append((p, v, *fr))
            (sum((t * w).sum() for t, w in zip(outputs, weights)) + 3.0 * h).backward()
            if run is fused:
                out, hinge = outputs, h
            else:
                expected, expected_hinge = outputs, h
        for a, b in zip(out, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hinge, expected_hinge, rtol=1e-5, atol=1e-6)
        assert float(expected_hinge.detach()) > 0
        for ours, ref in zip(*leaves):
            assert (ours.grad is None) == (ref.grad is None) == (not ours.requires_grad)
            if ref.grad is not None:
                torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)
        if mesh_grad:  # frame 1 is not drawn: nothing reaches it
            assert float(leaves[0][1].grad[1].abs().max()) == 0 and float(leaves[0][1].grad[0].abs().max()) > 0
