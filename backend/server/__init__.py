"""The ZeroMQ service, its protocol, jobs, avatar store and client library.

``protocol``, ``client`` and ``security`` import neither torch nor bpy: the Blender add-on
uses them as they are. Importing this package imports nothing else.
"""
