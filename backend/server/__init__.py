"""The ZeroMQ service: its operations, jobs, avatar store and device worker.

What it shares with the Blender add-on (protocol, client, security, argument specs) is in
``backend.wire``. Importing this package imports nothing else.
"""
