"""The main job, ``spatialavatar demo`` / ``make demo``: a portrait -> tracking -> Stage 1 ->
Stage 2 -> an animated .blend -> Blender's render with the avatar composited -> frames, a
GIF, an MP4 and a contact sheet.

``pipeline`` runs the steps (torch); ``scene`` builds the .blend in a bpy subprocess (no
torch); ``media`` turns the rendered frames into the GIF, MP4 and contact sheet.
"""
