"""Clients send bytes, never paths; ids never leave the store; CurveZMQ keeps strangers out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import zmq

from backend.cli import main as cli_main
from backend.gaussians.files import save_avatar
from backend.head.model import HeadModel
from backend.server.config import ServiceConfig
from backend.server.jobs import JobRecord
from backend.server.service import Service
from backend.server.store import Store
from backend.wire.client import Client, ServiceUnavailable
from backend.wire.errors import InputError, SpatialAvatarError
from backend.wire.protocol import ErrorCode, WireError
from backend.wire.security import ClientKeys
from tests.test_server_support import flame_buffers, front_camera, npz_buffer, service_thread, small_avatar

ESCAPES = [
    "../../secret",
    "../secret.npz",
    "/etc/passwd",
    "av_../../secret",
    "av_0123456789abcdef/../../secret",
    "av_0123456789abcdef/../av_0123456789abcdef",
    "av_0123456789ABCDEF",
    "av_0123456789abcdef\n",
    "av_0123456789abcdef\x00",
    "av_%2e%2e%2fsecret",
    "av_０１２３４５６７８９abcdef",
    "sb_0123456789abcdef/../../..",
    "jb_..",
]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and ".lock" not in p.name}


def test_ids_never_become_paths_outside_the_store(tmp_path: Path, head: HeadModel) -> None:
    (tmp_path / "secret").write_bytes(b"do not touch")
    (tmp_path / "secret.npz").write_bytes(b"do not touch")
    with service_thread(tmp_path / "store") as service, Client(service.endpoint, timeout_s=30) as client:
        aid = client.call("import", {"name": "../../secret"}, {"file": npz_buffer(small_avatar(head, 1000))}).result["avatar"]["id"]
        before = tree(tmp_path)
        K, w2c = front_camera(16)
        pose = flame_buffers(head, 1) | {"intrinsics": K, "world_to_cam": w2c}
        attempts = []
        for bad in ESCAPES:
            attempts += [
                ("get", {"id": bad}, {}),
                ("delete", {"id": bad}, {}),
                ("export", {"avatar": bad, "format": "npz"}, {}),
                ("render", {"avatar": bad, "width": 16, "height": 16}, pose),
                ("initialize", {"subject": bad}, {}),
                ("refine", {"avatar": bad, "subject": "sb_0123456789abcdef"}, {}),
                ("cancel", {"job": bad}, {}),
                ("watch", {"job": bad}, {}),
            ]
        for op, args, arrays in attempts:
            with pytest.raises(WireError) as info:
                client.call(op, args, arrays)
            assert info.value.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.NOT_FOUND), (op, args, info.value)
        # Nothing outside the store changed, and nothing inside either.
        assert tree(tmp_path) == before
        # A display name is only a name.
        assert client.call("get", {"id": aid}).result["avatar"]["name"] == "../../secret"
        assert sorted(p.name for p in (tmp_path / "store" / "avatars").iterdir()) == [f"{aid}.json", f"{aid}.npz"]


@pytest.mark.parametrize("field", ["path", "file", "filename", "store", "subject_dir"])
def test_no_operation_takes_a_path(tmp_path: Path, field: str) -> None:
    with service_thread(tmp_path / "store") as service, Client(service.endpoint, timeout_s=30) as client:
        for op in ("import", "export", "track", "generate", "initialize", "synthesize", "refine"):
            with pytest.raises(WireError) as info:
                client.call(op, {field: "/etc/passwd"})
            # Either the missing real input or the unknown argument is named; never a file read.
            assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_non_loopback_bind_needs_keys(tmp_path: Path) -> None:
    with pytest.raises(SpatialAvatarError, match="refusing to bind tcp://0.0.0.0"):
        Service(ServiceConfig(bind="tcp://0.0.0.0:*", store=tmp_path / "store", device="cpu"))
    assert not (tmp_path / "store").exists()  # refused before anything was made


def test_curve_keys_admit_only_authorized_clients(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    keys = tmp_path / "keys"
    assert cli_main(["keys", str(keys), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert Path(written["client_secret"]).stat().st_mode & 0o077 == 0  # secrets are private
    with service_thread(tmp_path / "store", keys=keys) as service:
        with Client(service.endpoint, timeout_s=1.0, retries=0) as plain, pytest.raises(ServiceUnavailable):
            plain.call("hello")
        server_public = ClientKeys.from_dir(keys).server_public
        stranger_keys = ClientKeys(server_public, *zmq.curve_keypair())
        with Client(service.endpoint, timeout_s=1.0, retries=0, keys=stranger_keys) as stranger, pytest.raises(ServiceUnavailable):
            stranger.call("hello")
        with Client(service.endpoint, timeout_s=30, keys=ClientKeys.from_dir(keys)) as friend:
            hello = friend.call("hello").result
            assert hello["secure"] is True
            assert hello["shared_memory"] is None  # other machines cannot map this one's memory
            assert friend.call("list").result["avatars"] == []


def test_keys_command_adds_clients_without_replacing_the_service_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    keys = tmp_path / "keys"
    assert cli_main(["keys", str(keys), "--json"]) == 0
    server_key = (keys / "server.key_secret").read_bytes()
    assert cli_main(["keys", str(keys), "--client", "laptop", "--json"]) == 0
    assert (keys / "server.key_secret").read_bytes() == server_key
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["blender.key", "laptop.key"]
    capsys.readouterr()
    assert cli_main(["keys", str(keys), "--client", "laptop"]) == 2  # exists: a one-line error
    assert "pick another --client name" in capsys.readouterr().err
    np.testing.assert_equal(len(ClientKeys.from_dir(keys, "laptop").secret), 40)


def test_symlinks_in_the_store_are_skipped_at_start_up(tmp_path: Path, head: HeadModel, caplog: pytest.LogCaptureFixture) -> None:
    store, outside = tmp_path / "store", tmp_path / "outside"
    real, linked_avatar, linked_subject, linked_job = "av_" + "1" * 16, "av_" + "2" * 16, "sb_" + "3" * 16, "jb_" + "4" * 16
    save_avatar(small_avatar(head, 1000), store / "avatars" / f"{real}.npz")
    save_avatar(small_avatar(head, 1000, seed=1), outside / "avatar.npz")
    (outside / "subject").mkdir()
    (outside / "subject" / "subject.json").write_text(json.dumps({"num_frames": 1, "num_cameras": 1, "width": 8, "height": 8}))
    # Queued, so a start-up that took it in would also rewrite it as interrupted.
    (outside / "job.json").write_text(json.dumps(JobRecord(linked_job, "refine", {}, "request").to_json()))
    links = {
        f"avatars/{linked_avatar}.npz": outside / "avatar.npz",
        f"subjects/{linked_subject}": outside / "subject",
        f"jobs/{linked_job}.json": outside / "job.json",
    }
    for name, target in links.items():
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).symlink_to(target)
    outside_before = tree(outside)

    with caplog.at_level(logging.WARNING, logger="spatialavatar.server"):
        with service_thread(store) as service, Client(service.endpoint, timeout_s=30) as client:
            assert [a["id"] for a in client.call("list").result["avatars"]] == [real]
            assert client.call("list", {"kind": "subjects"}).result["subjects"] == []
            assert client.call("list", {"kind": "jobs"}).result["jobs"] == []
            for thing in (linked_avatar, linked_subject, linked_job):
                with pytest.raises(WireError) as info:
                    client.call("get", {"id": thing})
                assert info.value.code == ErrorCode.NOT_FOUND

    skipped = [r.getMessage() for r in caplog.records if r.name == "spatialavatar.server" and "symlink" in r.getMessage()]
    assert sorted(skipped) == sorted(f"store: skipping {name}, a symlink (the store serves only what lies inside it)" for name in links)
    assert not any(str(tmp_path) in message for message in skipped)  # names inside the store, not paths of this machine
    assert all((store / name).is_symlink() for name in links)  # skipped, not removed
    assert tree(outside) == outside_before


def test_a_store_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "avatars").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="avatars is a symlink; the store's folders must be real folders"):
        Store(tmp_path / "store")
