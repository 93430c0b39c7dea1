"""L3MuscleSegLib: headless L3 muscle segmentation and body-composition metrics.

Pure Python (numpy, SimpleITK, torch, nnunetv2). Never imports Qt, VTK or Slicer, so the
same code serves the Slicer module, the ``l3muscleseg`` command line and batch runs.
"""

__version__ = "0.1.0"
