"""Training: a manifest split as PyTorch data (``loaders``), the training loop (``loop``), a run from setup to its
calibrated, gated checkpoint (``train``), crossval by source (``crossval``) and experiment logs (``tracking``).
"""
