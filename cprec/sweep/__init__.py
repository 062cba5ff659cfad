"""Sweeps: trials declared in config files (``product``, ``zip_``, ``seeds``), launchers, summaries.

Submodules: ``expand`` (config file -> trials), ``launch`` (local / SLURM), ``summarize`` (tables).
"""
from cprec.sweep.expand import apply_overrides, product, seeds, zip_

__all__ = ["apply_overrides", "product", "seeds", "zip_"]
