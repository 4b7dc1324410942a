"""Whole-slide images to patch features in CLAM's layout: ``clbench wsi tile`` and
``clbench wsi features`` (docs/wsi.md).

- :mod:`clbench.wsi.slide`: opening slides (OpenSlide if importable, else tiffslide).
- :mod:`clbench.wsi.tiling`: tissue segmentation and patch coordinates (``patches/``).
- :mod:`clbench.wsi.features`: the encoder table and feature extraction (``h5_files/``,
  ``pt_files/``).
- :mod:`clbench.wsi.store`: outputs written whole or not at all (resumable runs).

Nothing is imported here, so ``clbench`` commands stay fast.
"""
