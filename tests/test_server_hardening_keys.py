"""CurveZMQ key folders: private from the moment they are written, and followed by a running service."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from backend.cli import main as cli_main
from backend.wire.client import Client, ServiceUnavailable
from backend.wire.security import ClientKeys, ServerKeys
from tests.test_server_support import service_thread

REFUSED_WITHIN_S = 1.0  # a refused client hears nothing; this long is enough to tell
ANSWER_WITHIN_S = 30.0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_keys(keys: Path, client: str) -> None:
    assert cli_main(["keys", str(keys), "--client", client, "--json"]) == 0


def answers(endpoint: str, keys: Path, client: str, timeout_s: float = ANSWER_WITHIN_S) -> bool:
    """Whether ``client``'s key gets a reply on a new connection within ``timeout_s``."""
    with Client(endpoint, timeout_s=timeout_s, retries=0, keys=ClientKeys.from_dir(keys, client)) as c:
        try:
            return c.call("hello").result["secure"] is True
        except ServiceUnavailable:
            return False


def test_key_files_and_folders_are_private_whatever_the_umask(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    keys = tmp_path / "keys"
    previous = os.umask(0)  # the loosest umask: nothing may rely on the user's
    try:
        assert cli_main(["keys", str(keys), "--json"]) == 0
    finally:
        os.umask(previous)
    written = json.loads(capsys.readouterr().out)
    assert {mode(keys / d) for d in ("", "authorized", "clients")} == {0o700}
    assert mode(Path(written["server_secret"])) == mode(Path(written["client_secret"])) == 0o600
    assert mode(Path(written["server_public"])) == mode(Path(written["client_public"])) == 0o644
    # Written whole and renamed into place: no scratch file is left behind.
    files = sorted(str(p.relative_to(keys)) for p in keys.rglob("*") if p.is_file())
    assert files == ["authorized/blender.key", "clients/blender.key_secret", "server.key", "server.key_secret"]
    ServerKeys.load(keys)
    assert len(ClientKeys.from_dir(keys).secret) == 40


def test_keys_command_makes_an_older_open_key_folder_private(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    for folder in (keys, keys / "authorized", keys / "clients"):
        folder.mkdir()
        os.chmod(folder, 0o755)
    make_keys(keys, "laptop")
    assert {mode(keys / d) for d in ("", "authorized", "clients")} == {0o700}


def test_a_removed_client_key_is_refused_without_a_restart(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, "blender")
    make_keys(keys, "laptop")
    with service_thread(tmp_path / "store", keys=keys) as service:
        assert answers(service.endpoint, keys, "blender")
        (keys / "authorized" / "blender.key").unlink()
        assert not answers(service.endpoint, keys, "blender", REFUSED_WITHIN_S)
        assert answers(service.endpoint, keys, "laptop")  # the others stay admitted


def test_a_client_key_added_while_running_is_admitted(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, "blender")
    with service_thread(tmp_path / "store", keys=keys) as service:
        assert answers(service.endpoint, keys, "blender")
        make_keys(keys, "laptop")
        assert answers(service.endpoint, keys, "laptop")
