"""What the Blender add-on and the backend share, without torch or bpy.

The rule: a module that both sides import lives here, and only here. ``blender_addon/build.py``
copies this folder whole into the extension as its ``wire`` subpackage, so every module
imports numpy, pyzmq and the standard library only, and its siblings relatively
(``from .protocol import ...``); never another backend room. tests/test_wire.py imports each
one with torch, bpy and scipy made unavailable.

- ``protocol``: framing and checking of messages; ``client``: the Lazy Pirate client;
  ``shared_frames``: render replies through shared memory; ``windows``: cropped replies back
  to whole frames; ``security``: CurveZMQ keys and the loopback rule.
- ``operations``: each operation's argument names, defaults and ranges.
- ``environment``: the default endpoint and the environment variables both sides read.
- ``errors``: the user-facing errors (every backend room raises these too).
- ``blender_camera_math``: the one conversion between Blender's cameras and OpenCV's.
- ``expression_names``, ``arkit_csv``: the files both sides read (a ``flame_param.npz``'s
  expression names, Live Link Face CSVs).
"""
