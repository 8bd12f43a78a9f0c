"""The ``spatialavatar`` command line: a thin shell over the backend's rooms.

Every command takes ``--json`` for a machine-readable summary on stdout; progress bars go
to stderr. Errors print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from backend import __version__
from backend.errors import SpatialAvatarError


def _progress(desc: str, enabled: bool) -> Callable[[int, int], None]:
    """A tqdm bar on stderr driven by (done, total) callbacks."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if not enabled:
            return
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, file=sys.stderr, unit="frame", leave=False)
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar.pop("bar").close()

    return update


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SpatialAvatarError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    return name


def _head(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from backend.head.registry import load_head_model

    return load_head_model(args.flame)


def cmd_info(args: argparse.Namespace) -> dict:
    from backend.head.registry import fingerprint, resolve_flame_path
    from backend.render.gsplat_backend import gsplat_available

    head = _head(args)
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "rasterizer": "gsplat (CUDA)" if gsplat_available() else "pure-torch reference (CPU)",
        "head_model": {
            "name": head.name,
            "source": resolve_flame_path(args.flame),
            "fingerprint": fingerprint(head.data),
            "vertices": head.num_vertices,
            "faces": head.num_faces,
            "shape_components": head.n_shape,
            "expression_components": head.n_expr,
            "expression_names": list(head.expr_names),
        },
    }


def cmd_synth(args: argparse.Namespace) -> dict:
    from backend.data.synthetic import SynthConfig, synthesize

    config = SynthConfig(frames=args.frames, views=args.views, size=args.size, seed=args.seed, reference_gaussians=args.reference_gaussians)
    t0 = time.perf_counter()
    root = synthesize(_head(args), args.out, config, device=_device(args.device), progress=_progress("synth", not args.json))
    return {"subject": str(root), "frames": config.frames, "views": config.views, "size": config.size, "seconds": round(time.perf_counter() - t0, 2)}


def cmd_init(args: argparse.Namespace) -> dict:
    from backend.data.subject import Subject
    from backend.gaussians.files import save_avatar
    from backend.head.registry import check_fits
    from backend.refine.initialize import InitConfig, initialize_on_subject

    subject = Subject.load(args.subject)
    head = _head(args)
    if subject.info.head_model != head.name:
        raise SpatialAvatarError(f"subject {args.subject} was tracked with head model '{subject.info.head_model}', the loaded one is '{head.name}'")
    avatar = initialize_on_subject(head, subject, InitConfig(gaussians=args.gaussians, frame=args.frame, camera=args.camera))
    check_fits(head.data, avatar.head_name, avatar.head_fingerprint)
    save_avatar(avatar, args.out)
    return {"avatar": str(args.out), "gaussians": avatar.count, "visible_share": avatar.meta["visible_share"]}


def _load_avatar(args: argparse.Namespace, device: str):  # type: ignore[no-untyped-def]
    from backend.gaussians.files import load_avatar
    from backend.head.registry import check_fits

    avatar = load_avatar(args.avatar)
    head = _head(args)
    check_fits(head.data, avatar.head_name, avatar.head_fingerprint)
    return avatar.to(device), head.to(device)


def cmd_render(args: argparse.Namespace) -> dict:
    from backend.head.params import FlameParams
    from backend.render.animation import ViewConfig, render_animation, view_cameras, write_frames

    device = _device(args.device)
    avatar, head = _load_avatar(args, device)
    params = FlameParams.load(args.anim)
    view = ViewConfig(size=args.size, turntable_degrees=args.turntable)
    cams = view_cameras(view, params.batch_size)
    t0 = time.perf_counter()
    frames = render_animation(avatar, head, params, cams, torch.tensor(view.background))
    paths = write_frames(frames, Path(args.out), params.batch_size, _progress("render", not args.json))
    seconds = time.perf_counter() - t0
    return {"frames": len(paths), "out": str(args.out), "seconds": round(seconds, 2), "contact_sheet": str(Path(args.out) / "contact_sheet.png")}


def cmd_export_ply(args: argparse.Namespace) -> dict:
    from backend.gaussians.avatar import deform
    from backend.gaussians.files import export_ply
    from backend.head.params import FlameParams

    avatar, head = _load_avatar(args, "cpu")
    params = head.neutral_params(1)
    if args.anim:
        anim = FlameParams.load(args.anim)
        if not 0 <= args.frame < anim.batch_size:
            raise SpatialAvatarError(f"--frame {args.frame} is outside the animation's {anim.batch_size} frames")
        params = anim.index([args.frame])
    with torch.no_grad():
        splats = deform(avatar, head, params).frame(0)
    export_ply(splats, avatar.local.sh, args.out)
    return {"ply": str(args.out), "gaussians": avatar.count}


def cmd_demo(args: argparse.Namespace) -> dict:
    """Synthetic subject -> surface avatar -> scripted animation rendered as a turntable."""
    from backend.data.motion import showcase_animation
    from backend.data.subject import Subject
    from backend.data.synthetic import SynthConfig, synthesize
    from backend.gaussians.files import save_avatar
    from backend.refine.initialize import InitConfig, initialize_on_subject
    from backend.render.animation import ViewConfig, render_animation, view_cameras, write_frames

    device = _device(args.device)
    out = Path(args.out)
    head = _head(args)
    show = not args.json
    t0 = time.perf_counter()
    subject_dir = synthesize(head, out / "subject", SynthConfig(frames=4, size=args.size, seed=args.seed, reference_gaussians=150_000), device, _progress("synthetic subject", show))
    avatar = initialize_on_subject(head, Subject.load(subject_dir), InitConfig(gaussians=args.gaussians))
    save_avatar(avatar, out / "avatar.npz")
    params = showcase_animation(head, args.frames)
    params.save(out / "animation.npz")
    view = ViewConfig(size=args.size, turntable_degrees=120.0)
    frames = render_animation(avatar.to(device), head.to(device), params, view_cameras(view, args.frames), torch.tensor(view.background))
    paths = write_frames(frames, out / "frames", args.frames, _progress("turntable", show))
    return {
        "subject": str(subject_dir),
        "avatar": str(out / "avatar.npz"),
        "frames": len(paths),
        "contact_sheet": str(out / "frames" / "contact_sheet.png"),
        "device": device,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--flame", metavar="PATH", help="FLAME model folder or file (default: $SPATIALAVATAR_FLAME, else the built-in head)")
    common.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute (default: CUDA when present)")

    parser = argparse.ArgumentParser(prog="spatialavatar", description="SpatialAvatar backend: FLAME-bound 3D Gaussian heads.")
    parser.add_argument("--version", action="version", version=f"spatialavatar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", parents=[common], help="versions, device and the head model in use")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("synth", parents=[common], help="write a synthetic subject")
    p.add_argument("out", type=Path)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--views", type=int, default=1, help="1 = monocular video; more = a ring of cameras")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-gaussians", type=int, default=200_000, help="density of the ground-truth reference head")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("init", parents=[common], help="initialize an avatar on a subject (Gaussians on the surface)")
    p.add_argument("subject", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gaussians", type=int, default=100_000)
    p.add_argument("--frame", type=int, default=0, help="reference frame colours are taken from")
    p.add_argument("--camera", type=int, default=0)
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("render", parents=[common], help="render an avatar over a flame_param.npz animation to PNG frames")
    p.add_argument("avatar", type=Path)
    p.add_argument("--anim", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--turntable", type=float, default=0.0, metavar="DEGREES", help="yaw swept by the camera over the animation")
    p.set_defaults(fn=cmd_render)

    p = sub.add_parser("export-ply", parents=[common], help="export a standard 3DGS .ply at a pose")
    p.add_argument("avatar", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--anim", type=Path, help="flame_param.npz to take the pose from (default: neutral)")
    p.add_argument("--frame", type=int, default=0)
    p.set_defaults(fn=cmd_export_ply)

    p = sub.add_parser("demo", parents=[common], help="the main job: synthetic subject -> avatar -> animated turntable")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--gaussians", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except SpatialAvatarError as exc:
        print(f"spatialavatar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spatialavatar {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
