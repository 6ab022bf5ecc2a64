"""Pixels: decoding (``images``, ``dicom`` + ``dicom_display``), the one preprocessing definition (``pixels``), training
augmentation (``augment``), the preprocessed image cache (``cache``) and synthetic phantoms (``phantoms``).
Imports only the shared ground.
"""
