"""Stage 1: the K-source feed-forward generator, its training and evaluation.

Modules: ``model`` (the network, ``GeneratorConfig``), ``checkpoint`` (weight files),
``data`` (subject corpora, phase 1 / phase 2 samplers, batches), ``train`` (the two-phase
training loop, one GPU or torchrun DDP), ``generate`` (inference: sources -> Avatar),
``evaluate`` (novel views / expressions, K sweep, ablations, timing). See docs/generator.md.
"""
