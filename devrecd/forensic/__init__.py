"""Evaluative reporting: calibrated, bounded likelihood ratios, their verbal equivalents, validity figures.

* :mod:`devrecd.forensic.verbal`: the ENFSI verbal scale (the one table of thresholds and words).
* :mod:`devrecd.forensic.lr`: score -> log10 LR calibration fitted on development trials, ELUB
  bounds, the validity figures of the calibration set (NFI's ``lir`` package does the maths).
* :mod:`devrecd.forensic.plots`: Tippett plot, DET curve and score timelines as PNG.
* :mod:`devrecd.forensic.compare`: same source or different source, for any scorer.

``lir`` and matplotlib are imported where they are used: serving never imports this package.
"""
