"""Sweeps: trials declared in config files (``product``, ``zip_``, ``seeds``), launchers, summaries.

Submodules: ``expand`` (config file -> trials), ``launch`` (local / SLURM), ``summarize`` (tables).
"""
from cprec.sweep.expand import product, seeds, zip_

__all__ = ["product", "seeds", "zip_"]
