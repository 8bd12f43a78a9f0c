"""Batch work driven from the command line: rendering .blend files with their avatars composited."""
