"""Settings enter every configuration one way: ``with_overrides`` (flat or dotted names, None
keeps a value), then the configuration's own ``check``, whose error names the field, or the
flag or argument the caller knows it by. The CLI's defaults and the preset list are the
dataclasses' and the wire's."""

from __future__ import annotations

import pytest

from backend.cli import build_parser
from backend.configs import SettingError
from backend.data.synthetic import SynthConfig
from backend.demo.pipeline import DemoConfig
from backend.refine.config import RefineConfig, preset
from backend.refine.initialize import InitConfig
from backend.refine.regularizers import SurfaceHinge
from backend.tracking.crop import CropConfig
from backend.tracking.track import TrackConfig
from backend.tracking.video import FrameRange
from backend.wire import operations as ops
from backend.wire.errors import InputError


def test_overrides_flat_dotted_and_none() -> None:
    base = RefineConfig()
    out = base.with_overrides({"iterations": 7, "anti_spike.max_scale": 2.0, "lr.offset": 1e-3, "seed": None})
    assert (out.iterations, out.anti_spike.max_scale, out.lr.offset, out.seed) == (7, 2.0, 1e-3, base.seed)
    assert out.anti_spike.max_offset == base.anti_spike.max_offset and base.iterations == RefineConfig.iterations  # base untouched
    assert base.with_overrides({"surface": SurfaceHinge(max_depth=0.5)}).surface == SurfaceHinge(max_depth=0.5)
    with pytest.raises(InputError, match="RefineConfig has no setting 'iters'"):
        base.with_overrides({"iters": 3})
    with pytest.raises(InputError, match="RefineConfig.anti_spike has no setting 'max_scal'"):
        base.with_overrides({"anti_spike.max_scal": 3})
    with pytest.raises(InputError, match="give it whole"):
        base.with_overrides({"surface.max_depth": 0.5})  # None by default: no fields to set


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"iterations": 0}, "iterations"),
        ({"ssim_weight": 1.5}, "ssim_weight"),
        ({"opacity_sparsity": -1.0}, "opacity_sparsity"),
        ({"lpips_weight": -0.1}, "lpips_weight"),
        ({"anti_spike.max_scale": 0.0}, "anti_spike.max_scale"),
        ({"anti_spike.scale_weight": -1.0}, "anti_spike.scale_weight"),
        ({"surface": SurfaceHinge(max_depth=0.0)}, "surface.max_depth"),
        ({"lr.rotation": -1e-3}, "lr.rotation"),
        ({"log_every": 0}, "log_every"),
    ],
)
def test_refine_check_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(SettingError, match=f"setting '{field}'") as caught:
        RefineConfig().with_overrides(overrides)
    assert caught.value.field == field


def test_a_failed_check_speaks_the_callers_name() -> None:
    with pytest.raises(InputError, match=r"^--max-scale -1.0: the scale threshold must be > 0"):
        RefineConfig().with_overrides({"anti_spike.max_scale": -1.0}, {"anti_spike.max_scale": "--max-scale"})
    with pytest.raises(InputError, match=r"^max_scale 0.0: "):
        RefineConfig().with_overrides(ops.Refine.settings({"max_scale": 0.0}), ops.Refine.setting_names())


@pytest.mark.parametrize(
    "config, overrides, field",
    [
        (SynthConfig(), {"frames": 0}, "frames"),
        (SynthConfig(), {"size": 16}, "size"),
        (SynthConfig(), {"reference_gaussians": 10}, "reference_gaussians"),
        (InitConfig(), {"gaussians": 10}, "gaussians"),
        (InitConfig(), {"camera": -1}, "camera"),
        (DemoConfig(), {"cpu_iters": 0}, "cpu_iters"),
        (DemoConfig(), {"frames": 1}, "frames"),
        (DemoConfig(), {"device": "tpu"}, "device"),
    ],
)
def test_each_config_checks_its_fields(config, overrides: dict, field: str) -> None:
    config.check()  # the defaults work
    with pytest.raises(SettingError) as caught:
        config.with_overrides(overrides)
    assert caught.value.field == field


def test_track_config_checks_its_parts() -> None:
    assert TrackConfig().with_overrides({"crop.size": 256, "frames.stride": 2}).crop.size == 256
    with pytest.raises(InputError, match="--stride must be >= 1"):
        TrackConfig().with_overrides({"frames.stride": 0})


def test_one_preset_list_for_the_cli_and_the_service() -> None:
    for name in ops.REFINE_PRESETS:
        preset(name).check()
    with pytest.raises(ValueError) as caught:
        preset("fast")
    assert str(sorted(ops.REFINE_PRESETS)) in str(caught.value)  # preset() knows exactly these
    assert ops.Refine.preset.choices == ops.REFINE_PRESETS
    cli = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    (flag,) = [a for a in cli["refine"]._actions if a.dest == "preset"]
    assert tuple(flag.choices) == ops.REFINE_PRESETS


def test_cli_defaults_are_the_dataclasses() -> None:
    parse = build_parser().parse_args
    synth = parse(["synth", "out"])
    assert (synth.frames, synth.views, synth.size, synth.seed, synth.reference_gaussians) == (
        SynthConfig.frames, SynthConfig.views, SynthConfig.size, SynthConfig.seed, SynthConfig.reference_gaussians
    )
    init = parse(["init", "subject", "--out", "a.npz"])
    assert (init.gaussians, init.frame, init.camera) == (InitConfig.gaussians, InitConfig.frame, InitConfig.camera)
    refine = parse(["refine", "a.npz", "subject", "--out", "b.npz"])
    assert (refine.iters, refine.seed, refine.preset) == (RefineConfig.iterations, RefineConfig.seed, "ours")
    demo = parse(["demo"])
    assert (demo.out, demo.frames, demo.size, demo.cpu_iters) == (DemoConfig.out, DemoConfig.frames, DemoConfig.size, DemoConfig.cpu_iters)
    track = parse(["track", "x.png", "--out", "s"])
    assert (track.size, track.stride) == (CropConfig.size, FrameRange.stride)
    assert DemoConfig.gpu_iters == RefineConfig.iterations  # the demo's GPU schedule is the full one
