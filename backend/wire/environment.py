"""Where the two sides find each other outside the messages: the default endpoint and the
environment variables a batch render sets for Blender."""

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"  # loopback: anything else needs CurveZMQ keys (security.check_bind)
ENDPOINT_ENV = "SPATIALAVATAR_ENDPOINT"  # overrides the add-on's preferences (batch renders, farms)
ANIMATION_ENV = "SPATIALAVATAR_ANIMATION"  # "1": Blender renders an animation, so the add-on prefetches from the first frame
