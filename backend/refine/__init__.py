"""Stage 2: the starting avatar on a subject and its layout-preserving refinement."""
