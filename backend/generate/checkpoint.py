"""Generator weight files: the compact shipped checkpoint (fp16 weights).

A generator file is a ``torch.save`` dict of tensors, numbers and strings only, so
``torch.load(weights_only=True)`` reads it without unpickling code:

| key | meaning |
|---|---|
| format, version | "spatialavatar.generator", 1 |
| config | JSON of ``GeneratorConfig`` |
| head_name, head_fingerprint | the head model whose layout it predicts |
| resolution | R of the layout's UV grid |
| state | the state dict; floating-point parameters in fp16, buffers (layout, base scales) as they are |
| info | JSON: training summary (phase, steps, data, time, metrics) |

Training checkpoints (for resuming) are separate: see ``train.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from backend.atomic_write import atomic_path
from backend.gaussians.layout import Binding
from backend.generate.model import Generator, GeneratorConfig
from backend.head.model import HeadModel
from backend.wire.errors import HeadModelError, InputError

FORMAT = "spatialavatar.generator"
VERSION = 1
# Where `spatialavatar generate` looks when no --checkpoint is given.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "generator.pt"


def generator_state(model: Generator, info: dict | None = None, half: bool = True) -> dict:
    """The file contents for ``model`` (parameters in fp16 when ``half``)."""
    params = {name for name, _ in model.named_parameters()}
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if half and name in params and t.is_floating_point():
            t = t.half()
        state[name] = t.clone()
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(model.config.to_dict()),
        "head_name": model.head_name,
        "head_fingerprint": model.head_fingerprint,
        "resolution": model.resolution,
        "state": state,
        "info": json.dumps(info or {}),
    }


def save_generator(model: Generator, path: str | Path, info: dict | None = None, half: bool = True) -> Path:
    """Write a generator file (to a temporary name first, then renamed)."""
    path = Path(path)
    with atomic_path(path) as scratch:
        torch.save(generator_state(model, info, half), scratch)
    return path


def read_generator_file(path: str | Path) -> dict:
    """The validated dict of a generator file; InputError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"generator checkpoint not found: {path}; train one with `spatialavatar train --phase 1|2` "
            "or pass the file with --checkpoint (see docs/generator.md)"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise InputError(f"{path}: not a readable generator checkpoint ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: not a SpatialAvatar generator checkpoint (format field missing or different)")
    if data.get("version") != VERSION:
        raise InputError(f"{path}: generator checkpoint version {data.get('version')}; this build reads version {VERSION}")
    missing = [k for k in ("config", "head_name", "head_fingerprint", "resolution", "state") if k not in data]
    if missing:
        raise InputError(f"{path}: generator checkpoint lacks {missing}")
    return data


def generator_from_state(data: dict, head: HeadModel, source: str = "checkpoint") -> Generator:
    """Build the network of a generator file for ``head`` (on the CPU, fp32)."""
    from backend.head.registry import fingerprint, how_to_load

    if fingerprint(head.data) != data["head_fingerprint"]:
        raise HeadModelError(
            f"{source}: this generator was trained on head model '{data['head_name']}' ({data['head_fingerprint']}) and fits only "
            f"that head ({how_to_load(data['head_name'])}); the loaded model is '{head.data.name}' ({fingerprint(head.data)}). "
            f"For that head, train a generator on it (spatialavatar train {how_to_load(head.data.name)}, docs/generator.md) and pass its file "
            "to generate --checkpoint or serve --generator, or start from the surface (spatialavatar init) and refine"
        )
    config = GeneratorConfig.from_dict(json.loads(data["config"]))
    state = data["state"]
    binding = Binding(state["face_idx"].long(), state["bary"].float(), state["texel"].long(), int(data["resolution"]))
    model = Generator(config, head.faces.cpu(), binding, state["base_log_scale"].float(), data["head_name"], data["head_fingerprint"])
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise InputError(f"{source}: weights do not fit the architecture in its config ({exc})") from exc
    return model


def load_generator(path: str | Path | None, head: HeadModel) -> tuple[Generator, dict]:
    """The generator in ``path`` (default: the shipped one) and its training info."""
    path = Path(path) if path else DEFAULT_CHECKPOINT
    data = read_generator_file(path)
    model = generator_from_state(data, head, str(path))
    model.eval()
    return model, json.loads(data.get("info", "{}") or "{}")
