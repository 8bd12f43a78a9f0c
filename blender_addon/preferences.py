"""Add-on preferences: where the backend listens, how long to wait, CurveZMQ keys; and whether
Blender may reach that address."""

from __future__ import annotations

import bpy
from bpy.props import FloatProperty, IntProperty, StringProperty

from . import connection


class SPATIALAVATAR_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    endpoint: StringProperty(
        name="Backend address",
        default=connection.DEFAULT_ENDPOINT,
        description="ZeroMQ endpoint of `spatialavatar serve` (tcp://HOST:PORT)",
    )
    timeout_s: FloatProperty(
        name="Timeout", default=10.0, min=0.1, max=600.0, unit="TIME_ABSOLUTE", description="Seconds of silence before a request is sent again"
    )
    retries: IntProperty(name="Retries", default=1, min=0, max=20, description="Resends before the backend counts as unreachable")
    key_dir: StringProperty(
        name="CurveZMQ keys",
        subtype="DIR_PATH",
        default="",
        description="Folder written by `spatialavatar keys` (empty: no encryption, loopback only)",
    )

    def draw(self, context: bpy.types.Context) -> None:
        col = self.layout.column()
        col.prop(self, "endpoint")
        row = col.row()
        row.prop(self, "timeout_s")
        row.prop(self, "retries")
        col.prop(self, "key_dir")
        col.operator("spatialavatar.test_connection", icon="LINKED")


def get(context: bpy.types.Context | None = None) -> SPATIALAVATAR_AP_preferences:
    return (context or bpy.context).preferences.addons[__package__].preferences


def settings(context: bpy.types.Context | None = None) -> connection.Settings:
    p = get(context)
    return connection.Settings(endpoint=p.endpoint.strip(), timeout_s=float(p.timeout_s), retries=int(p.retries), key_dir=bpy.path.abspath(p.key_dir) if p.key_dir else "")


def blocked(settings: connection.Settings) -> str | None:
    """Why Blender may not reach ``settings.endpoint`` now (its *Allow Online Access* switch), or None."""
    if connection.wire_security.is_loopback(settings.endpoint) or getattr(bpy.app, "online_access", True):
        return None
    return f"{settings.endpoint} is not on this machine and online access is off (Preferences > System > Network)"
