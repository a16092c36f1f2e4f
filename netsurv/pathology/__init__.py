"""Whole-slide image stage 1: slide access (mpp chain), tissue masks, tiling, tile datasets.

- :mod:`.slides`   ``open_slide(path, mpp_override=None)`` -> :class:`SlideReader`
- :mod:`.tissue`   ``segment_tissue(slide, params)`` -> :class:`TissueMask`, ``save_qc``
- :mod:`.tiling`   ``tile_slide``, ``tile_one_slide`` (the tiling job's per-slide body),
  ``write_coords``, ``params_hash``, :class:`TileDataset`
- :mod:`.rawtiles` :class:`RawTileReader`: direct JPEG tile decoding for aligned grids
"""
from .slides import MppError, SlideError, SlideReader, open_slide

__all__ = ["MppError", "SlideError", "SlideReader", "open_slide"]
