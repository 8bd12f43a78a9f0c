"""Face landmarks and person masks with mediapipe's legacy solutions (models inside the wheel).

mediapipe 0.10.21 ships the face-detection (short and full range), face-mesh-with-iris
(478 points) and selfie-segmentation models inside its wheel; nothing is fetched at run time.

Detection runs in two steps so that small faces in large photos and several faces work:
the face detector finds every face in the whole image, the largest is taken, and the face
mesh runs on a square crop around it (mapped back to the image's pixels afterwards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

# mediapipe's C++ logging goes to stderr; keep it to errors (set before mediapipe is imported).
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The face-mesh input crop: a square of this many times the detector's box, at this resolution.
MESH_CROP_SCALE = 2.2
MESH_CROP_SIZE = 512
# A face whose eyes are closer than this (pixels, outer corners) is too small to fit.
MIN_INTER_OCULAR_PX = 12.0


@dataclass(frozen=True)
class FaceLandmarks:
    """One face in one image.

    Attributes:
        points: [478, 3] mediapipe landmarks in the image's pixels (x right, y down; pixel
            (0, 0)'s centre at (0.5, 0.5)); the third column is mediapipe's relative depth in
            the same pixel scale (smaller = nearer the camera).
        box: (x0, y0, x1, y1) the landmarks' bounding box, pixels.
        faces: how many faces the detector found in the image (the largest is this one).
        score: the detector's confidence for this face.
    """

    points: np.ndarray
    box: tuple[float, float, float, float]
    faces: int
    score: float

    @property
    def size(self) -> float:
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])


def _mp():  # type: ignore[no-untyped-def]
    import mediapipe as mp

    return mp


class Landmarker:
    """mediapipe face detection + face mesh (with iris) + selfie segmentation, CPU, offline.

    Use as a context manager, or call ``close()``; one instance serves many images.
    """

    def __init__(self, min_confidence: float = 0.5) -> None:
        mp = _mp()
        sol = mp.solutions
        self.min_confidence = min_confidence
        self._detectors = [
            sol.face_detection.FaceDetection(model_selection=0, min_detection_confidence=min_confidence),
            sol.face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_confidence),
        ]
        self._mesh = sol.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=2, refine_landmarks=True, min_detection_confidence=min_confidence)
        self._full_mesh: object | None = None
        self._segmenter = sol.selfie_segmentation.SelfieSegmentation(model_selection=0)

    def close(self) -> None:
        for s in [*self._detectors, self._mesh, self._segmenter, self._full_mesh]:
            if s is not None:
                s.close()  # type: ignore[attr-defined]
        self._detectors = []

    def __enter__(self) -> Landmarker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- detection ---------------------------------------------------------------------------

    def face_boxes(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """Every face the detector finds: (x0, y0, x1, y1, score) in pixels, largest first.

        The short-range model (faces within about 2 m) is tried first, then the full-range one.
        """
        h, w = rgb.shape[:2]
        for det in self._detectors:
            res = det.process(rgb)
            if not res.detections:
                continue
            boxes = []
            for d in res.detections:
                b = d.location_data.relative_bounding_box
                x0, y0 = b.xmin * w, b.ymin * h
                boxes.append((x0, y0, x0 + b.width * w, y0 + b.height * h, float(d.score[0])))
            return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        return []

    def _mesh_on_crop(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """Face mesh on a square crop around ``box``; [478, 3] points in image pixels or None."""
        cx, cy = 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])
        side = MESH_CROP_SCALE * max(box[2] - box[0], box[3] - box[1])
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        s = max(int(round(side)), 16)
        crop = Image.fromarray(rgb).crop((x0, y0, x0 + s, y0 + s)).resize((MESH_CROP_SIZE, MESH_CROP_SIZE), Image.BICUBIC)
        res = self._mesh.process(np.ascontiguousarray(np.asarray(crop)))
        if not res.multi_face_landmarks:
            return None
        # With two faces in the crop, keep the one nearest its centre.
        best, best_d = None, np.inf
        for face in res.multi_face_landmarks:
            p = np.array([(q.x, q.y, q.z) for q in face.landmark], np.float64)
            d = float(np.linalg.norm(p[:, :2].mean(axis=0) - 0.5))
            if d < best_d:
                best, best_d = p, d
        assert best is not None
        return np.stack([x0 + best[:, 0] * s, y0 + best[:, 1] * s, best[:, 2] * s], axis=1)

    def _mesh_on_image(self, rgb: np.ndarray) -> list[np.ndarray]:
        if self._full_mesh is None:
            self._full_mesh = _mp().solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=4, refine_landmarks=True, min_detection_confidence=self.min_confidence
            )
        res = self._full_mesh.process(rgb)  # type: ignore[attr-defined]
        h, w = rgb.shape[:2]
        out = []
        for face in res.multi_face_landmarks or []:
            p = np.array([(q.x, q.y, q.z) for q in face.landmark], np.float64)
            out.append(np.stack([p[:, 0] * w, p[:, 1] * h, p[:, 2] * w], axis=1))
        return out

    def detect(self, rgb: np.ndarray) -> FaceLandmarks | None:
        """The largest face's 478 landmarks, or None when no face is found."""
        rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        boxes = self.face_boxes(rgb)
        points = None
        faces = len(boxes)
        score = 0.0
        for box in boxes[:2]:
            points = self._mesh_on_crop(rgb, box[:4])
            if points is not None:
                score = box[4]
                break
        if points is None:
            found = self._mesh_on_image(rgb)
            if not found:
                return None
            found.sort(key=lambda p: -np.ptp(p[:, 0]) * np.ptp(p[:, 1]))
            points, faces, score = found[0], max(faces, len(found)), 0.0
        if points.shape[0] < 478:
            return None
        box = (float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max()))
        return FaceLandmarks(points=points, box=box, faces=max(faces, 1), score=score)

    # -- masks -------------------------------------------------------------------------------

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """[H, W] float32 person probability in [0, 1] (selfie segmentation, general model)."""
        rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        res = self._segmenter.process(rgb)
        m = res.segmentation_mask
        if m is None:
            return np.zeros(rgb.shape[:2], np.float32)
        return np.clip(np.asarray(m, np.float32), 0.0, 1.0)
