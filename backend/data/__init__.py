"""The subject format and synthetic subjects."""
