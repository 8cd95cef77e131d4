"""mlseg: microscopy nuclei segmentation, from images + masks to a deployed model and measurements."""

__version__ = "0.1.0"
