"""Prefetched composited renders in real Blender (the bpy module, background mode) against a
real backend subprocess on the CPU: frames requested ahead are in flight before Blender
reaches them, match frames requested when reached bit for bit, and are never used once the
frame's parameters changed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.addon_support import read_image
from tests.test_compositing import avatar, backend, build_scene, flame_copy  # noqa: F401  (fixtures)

pytestmark = pytest.mark.blender

SIZE = 48
LAST = 5  # frames 1..LAST


@pytest.fixture()
def shot(addon, backend, monkeypatch: pytest.MonkeyPatch):
    """An animated shot: keyed jaw and expression, a moving head and a moving camera."""
    import bpy

    monkeypatch.setenv(addon.compositing_job.ENDPOINT_ENV, backend[0])
    sc = build_scene(addon, backend[0], backend[1])
    sc.render.engine = "BLENDER_WORKBENCH"
    sc.render.resolution_x = sc.render.resolution_y = SIZE
    sc.render.image_settings.file_format = "OPEN_EXR"
    sc.render.image_settings.color_depth = "32"
    sc.frame_start, sc.frame_end = 1, LAST
    head, cam = sc.objects["Head"], sc.camera
    group = head.spatialavatar_flame
    for frame, jaw, smile, x in ((1, 0.0, 0.0, 0.15), (3, 0.2, 1.5, 0.2), (LAST, 0.35, -1.0, 0.25)):
        group.jaw_pose = (jaw, 0.0, 0.0)
        group.expr_0 = [smile if i < 3 else 0.0 for i in range(25)]
        group.keyframe_insert("jaw_pose", frame=frame)
        group.keyframe_insert("expr_0", frame=frame)
        head.rotation_euler.z = x - 0.2
        head.keyframe_insert("rotation_euler", frame=frame)
        cam.location.x = x
        cam.keyframe_insert("location", frame=frame)
    addon.compositing.setup_compositing(sc)
    bpy.context.view_layer.update()
    return sc


def _window(addon, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    job = addon.compositing_job
    monkeypatch.setattr(job, "CONFIG", dataclasses.replace(job.CONFIG, prefetch_frames=size))


def _render(addon, sc, out: Path, on_frame: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """An animation render (``on_frame`` runs after the add-on's handler at each rendered
    frame); the frames as [H, W, 4]."""
    import bpy

    def handler(scene, _depsgraph=None) -> None:
        if addon.runtime.RUNTIME.render_job is not None:  # not the frame change that restores the scene's frame afterwards
            on_frame(scene.frame_current)

    sc.render.filepath = f"{out}{os.sep}"
    if on_frame is not None:
        bpy.app.handlers.frame_change_post.append(handler)
    try:
        assert bpy.ops.render.render(animation=True) == {"FINISHED"}
    finally:
        if handler in bpy.app.handlers.frame_change_post:
            bpy.app.handlers.frame_change_post.remove(handler)
    return [read_image(out / f"{f:04d}.exr") for f in range(sc.frame_start, sc.frame_end + 1)]


def _ahead(addon) -> list[int]:
    """The frames whose requests the running render has in flight."""
    return sorted({f for f, _ in addon.runtime.RUNTIME.render_job.in_flight})


def test_the_window_lists_the_next_frames_of_the_range(addon) -> None:
    window = addon.compositing_frames.window
    assert list(window(1, 10, 1, 4)) == [2, 3, 4]
    assert list(window(3, 10, 3, 4)) == [6, 9]  # frame step, and the range's end
    assert list(window(5, 10, 1, 1)) == [] and list(window(5, 10, 1, 0)) == []


def test_prefetched_frames_are_in_flight_early_and_match_frames_requested_when_reached(shot, addon, monkeypatch, tmp_path: Path) -> None:
    state = addon.runtime.RUNTIME
    _window(addon, monkeypatch, 1)
    reference = _render(addon, shot, tmp_path / "one")
    assert not any(s.prefetched for s in state.render_stats)
    assert all(np.abs(reference[0] - f).max() > 0.05 for f in reference[1:])  # the animation shows

    _window(addon, monkeypatch, 3)
    ahead: dict[int, list[int]] = {}
    frames = _render(addon, shot, tmp_path / "three", lambda f: ahead.__setitem__(f, _ahead(addon)))
    # The first frame cannot tell an animation from a still; from the second on, two frames are ahead.
    assert ahead == {1: [], 2: [3, 4], 3: [4, 5], 4: [5], 5: []}
    assert [s.prefetched for s in state.render_stats] == [False, False, True, True, True]
    for got, want in zip(frames, reference, strict=True):
        np.testing.assert_array_equal(got, want)
    assert state.render_job is None  # the render's end forgot what was in flight


def test_an_animation_known_at_its_start_prefetches_from_the_first_frame(shot, addon, monkeypatch, tmp_path: Path) -> None:
    """The batch wrapper's environment (or ``blender -b ... -a``) says the render is an
    animation: the second frame is in flight while Blender renders the first."""
    state = addon.runtime.RUNTIME
    _window(addon, monkeypatch, 1)
    reference = _render(addon, shot, tmp_path / "one")
    monkeypatch.setenv(addon.compositing_job.ANIMATION_ENV, "1")
    _window(addon, monkeypatch, 3)
    ahead: dict[int, list[int]] = {}
    frames = _render(addon, shot, tmp_path / "three", lambda f: ahead.__setitem__(f, _ahead(addon)))
    assert ahead == {1: [2, 3], 2: [3, 4], 3: [4, 5], 4: [5], 5: []}
    assert [s.prefetched for s in state.render_stats] == [False, True, True, True, True]
    for got, want in zip(frames, reference, strict=True):
        np.testing.assert_array_equal(got, want)


def test_an_animation_render_is_recognised_from_the_command_line(addon, monkeypatch) -> None:
    job = addon.compositing_job
    monkeypatch.delenv(job.ANIMATION_ENV, raising=False)
    for argv, animation in ((["blender", "-b", "shot.blend", "-a"], True), (["blender", "-b", "shot.blend", "--render-anim"], True), (["blender", "-b", "shot.blend", "-f", "3"], False)):
        monkeypatch.setattr("sys.argv", argv)
        assert job.animation_render() is animation, argv


def test_a_frame_whose_keys_change_after_its_request_is_requested_again(shot, addon, monkeypatch, tmp_path: Path) -> None:
    """A handler moves the last jaw key while the frames it moves are in flight: the replies
    made from the old key are dropped, and those frames equal a render made with the new key."""
    state = addon.runtime.RUNTIME
    head = shot.objects["Head"]
    fcurves = addon.animation_io.fcurve_collection(head, create=False)
    jaw = fcurves.find("spatialavatar_flame.jaw_pose", index=0)
    original = _render(addon, shot, tmp_path / "original")

    def move_key(value: float) -> None:
        key = jaw.keyframe_points[-1]
        assert key.co.x == LAST
        key.co.y = value
        jaw.update()

    _window(addon, monkeypatch, 3)
    seen: dict[int, list[int]] = {}

    def on_frame(frame: int) -> None:
        seen[frame] = _ahead(addon)
        if frame == 3:
            move_key(-0.3)

    changed = _render(addon, shot, tmp_path / "changed", on_frame)
    assert seen[3] == [4, LAST]  # both frames the key moves were in flight with the old key
    # Frame 3 holds its key; frames 4 and 5 lie on the curve into the moved key.
    assert [s.prefetched for s in state.render_stats] == [False, False, True, False, False]

    _window(addon, monkeypatch, 1)
    reference = _render(addon, shot, tmp_path / "reference")  # the key moved for the whole render
    for got, want in zip(changed, original[:3] + reference[3:], strict=True):
        np.testing.assert_array_equal(got, want)
    for got, old in zip(changed[3:], original[3:]):
        assert np.abs(got - old).max() > 0.05  # the stale replies would have shown the old jaw


def test_a_camera_with_a_constraint_is_requested_frame_by_frame(shot, addon, monkeypatch, tmp_path: Path) -> None:
    """F-curves cannot say where a constrained camera looks: no frame is requested ahead."""
    state = addon.runtime.RUNTIME
    shot.frame_end = 3
    track = shot.camera.constraints.new("TRACK_TO")
    track.target, track.track_axis, track.up_axis = shot.objects["Head"], "TRACK_NEGATIVE_Z", "UP_Y"
    _window(addon, monkeypatch, 4)
    seen: dict[int, tuple[list[int], str | None]] = {}
    _render(addon, shot, tmp_path / "constrained", lambda f: seen.__setitem__(f, (_ahead(addon), state.render_job.unpredictable)))
    assert seen[1] == ([], None)
    assert seen[2] == seen[3] == ([], "object 'Camera' has constraints")
    assert len(state.render_stats) == 3 and not any(s.prefetched for s in state.render_stats)


def test_a_still_render_requests_just_its_frame(shot, addon, monkeypatch, tmp_path: Path) -> None:
    import bpy

    state = addon.runtime.RUNTIME
    _window(addon, monkeypatch, 4)
    shot.frame_set(1)
    seen: list[list[int]] = []

    def handler(scene, _depsgraph=None) -> None:
        if state.render_job is not None:
            seen.append(_ahead(addon))

    bpy.app.handlers.frame_change_post.append(handler)
    try:
        shot.render.filepath = str(tmp_path / "still.exr")
        assert bpy.ops.render.render(write_still=True) == {"FINISHED"}
    finally:
        bpy.app.handlers.frame_change_post.remove(handler)
    assert seen == [[]]
    assert [(s.frame, s.prefetched) for s in state.render_stats] == [(1, False)]
