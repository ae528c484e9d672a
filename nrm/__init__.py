"""nrm: a node resource manager for HPC compute nodes."""

__version__ = "0.1.0"
