"""Each operation's JSON arguments: names, defaults and ranges, in one place for both sides.

The service's handlers read a request with these specs (``backend.server.args.Args``), so a
range here is what the service enforces; the add-on builds its requests with
``Operation.args`` and bounds its settings with the same ranges, so neither side spells an
argument's name on its own. docs/protocol.md describes every operation.

A spec's ``default``: ``REQUIRED``; None, an optional argument whose absence the service
fills in (for jobs, from the configuration dataclass that takes the value, e.g.
``SynthConfig``); or the value itself. A job argument's ``setting`` names the configuration
field it overrides (``Config.with_overrides``; dotted for nested ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .protocol import ACK


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
MAX_INT = 2**63 - 1  # an Int's top when it has no bound of its own
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Spec:
    """One argument; its ``name`` is the attribute it is assigned to in an ``Operation``."""

    default: Any = REQUIRED
    setting: str = ""  # the configuration field a job argument overrides; "" for none

    def __set_name__(self, owner: type, name: str) -> None:
        object.__setattr__(self, "name", name)  # frozen: set once, when the operation class is made

    name: str = ""  # filled by __set_name__


@dataclass(frozen=True)
class Int(Spec):
    """An integer in [lo, hi]."""

    lo: int = 0
    hi: int = MAX_INT


@dataclass(frozen=True)
class Float(Spec):
    """A finite number in [lo, hi]."""

    lo: float = -math.inf
    hi: float = math.inf


@dataclass(frozen=True)
class Flag(Spec):
    """true or false."""


@dataclass(frozen=True)
class Text(Spec):
    """Printable text of 1 to ``max_len`` characters, one of ``choices`` when given."""

    choices: Sequence[str] | None = None
    max_len: int = 128


@dataclass(frozen=True)
class Floats(Spec):
    """A list of ``length`` numbers in [lo, hi]."""

    length: int = 3
    lo: float = -math.inf
    hi: float = math.inf


class Operation:
    """An operation: its wire name ``op`` and its arguments as ``Spec`` class attributes."""

    op: ClassVar[str]

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        return {k: v for k, v in vars(cls).items() if isinstance(v, Spec)}

    @classmethod
    def args(cls, **values: Any) -> dict[str, Any]:
        """A request's ``args`` from keyword arguments named as the specs; None leaves one out.
        Raises TypeError for a name the operation does not have (a bug, not a user error)."""
        unknown = sorted(set(values) - set(cls.specs()))
        if unknown:
            raise TypeError(f"{cls.op} has no argument '{unknown[0]}'")
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def settings(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The configuration overrides among a job's argument ``values`` (setting -> value)."""
        return {spec.setting: values.get(name) for name, spec in cls.specs().items() if spec.setting}

    @classmethod
    def setting_names(cls) -> dict[str, str]:
        """setting -> argument name, so a configuration's check names the argument."""
        return {spec.setting: name for name, spec in cls.specs().items() if spec.setting}


# -- store and control ---------------------------------------------------------------------


class Hello(Operation):
    op = "hello"


class List(Operation):
    op = "list"
    kind = Text("avatars", choices=("avatars", "subjects", "jobs"))


class Get(Operation):
    op = "get"
    id = Text()  # an avatar, subject or job id
    buffers = Flag(False)  # avatars: also their Gaussian buffers


class Delete(Operation):
    op = "delete"
    id = Text()


class Import(Operation):
    """Buffer ``file``: an avatar .npz."""

    op = "import"
    name = Text(None)


class Cancel(Operation):
    op = "cancel"
    job = Text()


class Resume(Operation):
    op = "resume"
    job = Text()


class Shutdown(Operation):
    op = "shutdown"


class Watch(Operation):
    op = "watch"
    job = Text()


class Ack(Operation):
    """Credit for a stream: reply ``seq`` of request ``request`` arrived."""

    op = ACK
    request = Text()
    seq = Int()


# -- device operations (FLAME and camera buffers: docs/protocol.md) ------------------------


class Deform(Operation):
    op = "deform"
    avatar = Text()
    max_gaussians = Int(None, lo=1)  # an evenly spread subset; at most the avatar's count
    statics = Flag(False)  # the first reply also carries opacities and colours


class Render(Operation):
    op = "render"
    avatar = Text()
    width = Int(lo=1)  # pixels; at most the service's max_image_side
    height = Int(lo=1)
    rgba = Text("<f4", choices=("<f4", "<f2", "<u1"))
    depth = Text("<f4", choices=("<f4", "<f2", "none"))
    background = Floats(None, length=3, lo=0.0, hi=1.0)  # linear RGB; absent: transparent
    crop = Flag(False)
    shared_memory = Flag(False)


class Export(Operation):
    op = "export"
    avatar = Text()
    format = Text("npz", choices=("npz", "ply"))


# -- jobs (None: the configuration's default) ----------------------------------------------


class Synthesize(Operation):
    op = "synthesize"
    frames = Int(None, "frames", lo=1, hi=600)
    views = Int(None, "views", lo=1, hi=16)
    size = Int(None, "size", lo=32, hi=2048)  # pixels
    seed = Int(None, "seed", lo=0, hi=MAX_SEED)
    reference_gaussians = Int(None, "reference_gaussians", lo=1)  # at most the service's max_gaussians


class Initialize(Operation):
    op = "initialize"
    subject = Text()
    gaussians = Int(None, "gaussians", lo=1)  # at most the service's max_gaussians
    frame = Int(None, "frame")  # the reference view; within the subject's frames
    camera = Int(None, "camera")  # and cameras
    name = Text(None)


REFINE_PRESETS = ("ours", "no-antispike", "densify")  # ours, baseline (b), baseline (a): backend.refine.config.preset


class Refine(Operation):
    op = "refine"
    avatar = Text()
    subject = Text()
    preset = Text("ours", choices=REFINE_PRESETS)
    iterations = Int(None, "iterations", lo=1, hi=1_000_000)
    checkpoint_every = Int(None, "checkpoint_every", lo=1, hi=1_000_000)
    max_scale = Float(None, "anti_spike.max_scale", lo=1e-3, hi=1e3)  # the anti-spike scale threshold, triangle sizes
    name = Text(None)


class Track(Operation):
    """Buffers ``image0`` .. (photos) or one ``video``."""

    op = "track"
    max_images = 64
    size = Int(None, "crop.size", lo=64, hi=2048)  # crop side, pixels
    max_frames = Int(None, "frames.max_frames", lo=1, hi=100_000)  # of a video


class Generate(Operation):
    """Buffers ``portrait0`` .. (photos), or a stored ``subject``.

    ``outline``: fit the hair volume and outline to the sources' person masks after the
    network (``backend.generate.outline``); absent, on. ``personalize``: refine the
    generated avatar briefly on its own sources (``backend.generate.personalize``); absent,
    ``personalize_default``, which hello reports. ``personalize_iterations`` sets
    ``Personalization.iterations`` and is refused when personalization is off.
    """

    # On every device: CUDA's 500 steps (0.6 s on an H100) gain 8.2 dB held-out in the person
    # mask on the real benchmark's ten clips; the CPU's 70 (44 s at 512 px on two cores) did as
    # well on the two clips measured.
    personalize_default: ClassVar[bool] = True

    op = "generate"
    max_portraits = 4
    subject = Text(None)
    frames = Text(None)  # the subject's views, e.g. "0,3" or "0:1"
    name = Text(None)
    outline = Flag(None)
    personalize = Flag(None)
    personalize_iterations = Int(None, "iterations", lo=1, hi=1_000_000)

