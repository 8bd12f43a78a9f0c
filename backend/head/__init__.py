"""FLAME-format head models: real FLAME from a user path, or the built-in stand-in head."""
