"""Tracking: real portraits and videos into the subject format.

mediapipe (models inside its wheel, nothing downloaded) finds 478 face landmarks and a
person mask; a landmark fit of the head model gives shared identity, per-frame expression,
jaw, neck, eyes, head pose and the focal length; the result is a subject folder.

Modules: ``images`` (robust photo reading), ``video`` (input sources: photos, PyAV video,
frame folders), ``landmarks`` (mediapipe), ``correspondence`` (mediapipe <-> head model),
``fit`` (the optimizer), ``crop`` (crops, intrinsics, masks), ``preview`` (overlay images),
``track`` (the pipeline).
"""

from backend.tracking.track import TrackConfig, TrackResult, track

__all__ = ["TrackConfig", "TrackResult", "track"]
