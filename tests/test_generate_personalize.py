"""Personalization as Generate's last step, where a user generates: the `generate` command (a
real subprocess), the service's `generate` job (a real service on loopback), and the demo's
generate stage. Everything runs on the tiny test head with an untrained tiny generator at
32 x 32 px, so each run takes seconds on a 2-core CPU; personalization's own effect on
quality is tests/test_personalize.py's subject, the wiring is this file's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from backend.cli import main
from backend.data.subject import Subject
from backend.data.synthetic import SynthConfig, synthesize
from backend.demo.pipeline import DemoConfig, personalize_generated
from backend.gaussians.files import load_avatar
from backend.generate.checkpoint import load_generator, save_generator
from backend.generate.generate import generate_avatar
from backend.generate.model import Generator, preset
from backend.generate.personalize import Personalization
from backend.head.flame_files import write_flame
from backend.wire.client import Client
from backend.wire.protocol import ErrorCode, WireError
from tests.test_generate_support import one_thread, tiny_head, tiny_head_data  # noqa: F401 (autouse fixture)
from tests.test_server_support import REPO, service_thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny head as a FLAME folder, a tiny generator for it, and a 2-frame 32 px subject."""
    tmp = tmp_path_factory.mktemp("personalize")
    head = tiny_head()
    return {
        "flame": write_flame(tiny_head_data(), tmp / "tiny_flame"),
        "checkpoint": save_generator(Generator.for_head(preset("tiny"), head).eval(), tmp / "generator.pt"),
        "subject": synthesize(head, tmp / "subject", SynthConfig(frames=2, size=32, seed=5, reference_gaussians=4_000)),
    }


def _cli(setup: dict[str, Path], out: Path, *flags: str) -> list[str]:
    inputs = [str(setup["subject"]), "--out", str(out), "--flame", str(setup["flame"]), "--checkpoint", str(setup["checkpoint"])]
    return ["generate", *inputs, "--device", "cpu", *flags]


def test_generate_command_personalizes_when_asked(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "personalized.npz"
    cmd = [sys.executable, "-m", "backend", *_cli(setup, out, "--personalize", "--personalize-iterations", "3")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert summary["personalized"] == "True" and float(summary["personalize_s"]) > 0
    assert "personalize" in proc.stderr  # its progress bar
    meta = load_avatar(out).meta
    assert meta["personalized"]["iterations"] == 3 and meta["personalized"]["frames"] == [0]
    assert meta["refined_iterations"] == 3


def test_personalization_runs_by_default_on_the_cpu_with_the_cpu_schedule(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for flags in ((), ("--personalize",)):  # the default, then the explicit switch
        out = tmp_path / "cpu.npz"
        assert main([*_cli(setup, out, *flags), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["personalized"] is True
        assert load_avatar(out).meta["personalized"]["iterations"] == Personalization.cpu_iterations < Personalization.iterations


def test_generate_command_leaves_it_out_when_told(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plain.npz"
    assert main([*_cli(setup, out, "--no-personalize"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["personalized"] is False
    assert "personalized" not in load_avatar(out).meta
    cases = [
        (("--no-personalize", "--personalize-iterations", "3"), "--personalize-iterations 3: personalization does not run (--no-"),
        (("--personalize", "--personalize-iterations", "0"), "--personalize-iterations 0: must be >= 1"),
    ]
    for flags, message in cases:
        assert main(_cli(setup, tmp_path / "refused.npz", *flags)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "refused.npz").exists()


@pytest.fixture(scope="module")
def served(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, str]]:
    """(client, subject id) of a CPU service on the tiny head with the tiny generator."""
    store = tmp_path_factory.mktemp("store")
    with (
        service_thread(store, flame=str(setup["flame"]), generator=setup["checkpoint"]) as service,
        Client(service.endpoint, timeout_s=60, retries=0) as client,
    ):
        job = client.call("synthesize", {"frames": 2, "size": 32, "seed": 5, "reference_gaussians": 4_000}).result["job"]
        final = client.call("watch", {"job": job["id"]}).result["job"]
        assert final["state"] == "done", final
        yield client, final["result"]["subject"]


def _run(client: Client, args: dict) -> dict:
    """Submit a generate job and wait for its final record."""
    job = client.call("generate", args).result["job"]
    return client.call("watch", {"job": job["id"]}).result["job"]


def _buffers(client: Client, aid: str) -> tuple[dict, dict[str, np.ndarray]]:
    reply = client.call("get", {"id": aid, "buffers": True})
    return reply.result["avatar"]["meta"], reply.arrays


def test_service_generate_personalizes_when_asked(served: tuple[Client, str]) -> None:
    client, sid = served
    assert client.call("hello").result["capabilities"]["generate"]["personalize"] is True  # a CPU service too

    by_default = _run(client, {"subject": sid})  # left out: the default
    assert by_default["state"] == "done" and by_default["params"]["personalize"] is True and by_default["result"]["personalized"] is True
    assert _buffers(client, by_default["result"]["avatar"])[0]["personalized"]["iterations"] == Personalization.cpu_iterations
    plain = _run(client, {"subject": sid, "personalize": False})
    assert plain["state"] == "done" and plain["params"]["personalize"] is False and plain["result"]["personalized"] is False
    plain_meta, plain_buffers = _buffers(client, plain["result"]["avatar"])
    assert "personalized" not in plain_meta

    final = _run(client, {"subject": sid, "personalize": True, "personalize_iterations": 3})
    assert final["state"] == "done", final
    assert final["params"]["personalize"] is True and final["result"]["personalized"] is True
    meta, buffers = _buffers(client, final["result"]["avatar"])
    assert meta["personalized"]["iterations"] == 3
    # The same generated start, moved by the steps on its source; the layout stays.
    assert np.array_equal(buffers["face_idx"], plain_buffers["face_idx"])
    assert not np.array_equal(buffers["sh"], plain_buffers["sh"])


def test_service_refuses_bad_personalization_naming_the_argument(served: tuple[Client, str]) -> None:
    client, sid = served
    cases = [
        ({"personalize": "yes"}, "argument 'personalize' must be true or false"),
        ({"outline": 1}, "argument 'outline' must be true or false"),
        ({"personalize": True, "personalize_iterations": 0}, "argument 'personalize_iterations' must be an integer in [1, 1000000]"),
        ({"personalize": False, "personalize_iterations": 3}, "'personalize_iterations' needs 'personalize' true: it is false"),
    ]
    jobs_before = len(client.call("list", {"kind": "jobs"}).result["jobs"])
    for extra, message in cases:
        with pytest.raises(WireError) as err:
            client.call("generate", {"subject": sid} | extra)
        assert err.value.code == ErrorCode.INVALID_ARGUMENT and message in str(err.value), str(err.value)
    assert len(client.call("list", {"kind": "jobs"}).result["jobs"]) == jobs_before  # nothing was queued


def test_cancel_stops_personalization_and_keeps_no_avatar(served: tuple[Client, str]) -> None:
    client, sid = served
    iterations = 20_000  # minutes of steps: only a cancel ends it within the test
    job = client.call("generate", {"subject": sid, "personalize": True, "personalize_iterations": iterations}).result["job"]
    events: list[dict] = []
    for reply in client.stream("watch", {"job": job["id"]}):
        events.append(reply.result["job"])
        if events[-1]["message"].startswith("personalize") and not any(e["message"].startswith("personalize") for e in events[:-1]):
            client.call("cancel", {"job": job["id"]})  # once personalization has begun
    assert events[-1]["state"] == "cancelled", events[-1]
    assert any(e["total"] == iterations for e in events) and events[-1]["step"] < iterations
    with pytest.raises(WireError) as err:
        client.call("get", {"id": job["result"]["avatar"]})
    assert err.value.code == ErrorCode.NOT_FOUND


def test_demo_personalizes_where_its_config_says(setup: dict[str, Path]) -> None:
    head = tiny_head()
    subject = Subject.load(setup["subject"])
    model, _ = load_generator(setup["checkpoint"], head)
    generated = generate_avatar(model, head, subject, [(0, 0)])
    assert DemoConfig(device="cuda").personalizes and not DemoConfig(device="cpu").personalizes

    lines: list[str] = []
    same, line = personalize_generated(generated, head, subject, DemoConfig(), lines.append)
    assert same is generated and line == "not personalized (off on cpu: cpu_personalize)" and lines == [f"      {line}"]

    out, line = personalize_generated(generated, head, subject, DemoConfig(cpu_personalize=True, personalize_iterations=2), lines.append)
    assert out.meta["personalized"]["iterations"] == 2 and line.startswith("personalized: 2 steps on the portrait")
