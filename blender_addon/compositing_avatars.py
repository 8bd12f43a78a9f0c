"""The avatars a render needs, on whichever backend renders it.

An avatar object names its avatar by the backend's id. A render farm worker's own backend
has a store of its own, where that id may not exist. So the avatar's ``.npz`` file (the
service's ``export``) can travel inside the .blend, as a bytes property of the object's mesh.
A backend that lacks the id gets the file through ``import``, once: the imported avatar's
name holds the original id and a hash of the file, and a later render finds it by that name.
"""

from __future__ import annotations

import hashlib

import bpy
import numpy as np

from . import connection

ops = connection.wire_operations

EMBEDDED = "spatialavatar_avatar_npz"  # mesh ID property: the avatar's .npz bytes


class MissingAvatar(RuntimeError):
    """The backend lacks an avatar and the .blend does not carry it."""


def embed(obj: bpy.types.Object, aid: str, client: connection.wire_client.Client) -> int:
    """Store avatar ``aid``'s file in ``obj``'s mesh (saved with the .blend); returns its size in bytes."""
    data = client.call(ops.Export.op, ops.Export.args(avatar=aid, format="npz")).arrays["file"].tobytes()
    obj.data[EMBEDDED] = data
    return len(data)


def is_embedded(obj: bpy.types.Object) -> bool:
    """Whether ``obj``'s mesh carries its avatar file (without copying the bytes)."""
    return obj.data is not None and EMBEDDED in obj.data


def embedded(obj: bpy.types.Object) -> bytes | None:
    data = obj.data.get(EMBEDDED) if obj.data is not None else None
    return bytes(data) if data else None


def import_name(aid: str, data: bytes) -> str:
    """The display name an embedded avatar is imported under: its original id and content."""
    return f"{aid} embedded {hashlib.sha256(data).hexdigest()[:16]}"


def resolve(client: connection.wire_client.Client, obj: bpy.types.Object, aid: str) -> str:
    """The id under which the backend has ``obj``'s avatar: ``aid`` itself, an earlier import
    of the embedded file, or a new import of it. Raises MissingAvatar."""
    try:
        client.call(ops.Get.op, ops.Get.args(id=aid))
        return aid
    except connection.WireError as e:
        if e.code != "not_found":
            raise
    data = embedded(obj)
    if data is None:
        raise MissingAvatar(
            f"object '{obj.name}' shows avatar {aid}, which the backend does not have and the file does not carry "
            "(use the store that made it, or Embed Avatars before sending the file away)"
        )
    name = import_name(aid, data)
    known = client.call(ops.List.op, ops.List.args(kind="avatars")).result.get("avatars", [])
    for summary in known:
        if summary.get("name") == name:
            return str(summary["id"])
    reply = client.call(ops.Import.op, ops.Import.args(name=name), {"file": np.frombuffer(data, np.uint8)})
    return str(reply.result["avatar"]["id"])
