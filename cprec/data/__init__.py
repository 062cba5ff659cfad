"""Datasets for next-item recommendation: readers, preprocessing, cache, synthetic data."""

from cprec.data.dataset import SequenceDataset, default_data_config, load_dataset, load_sequences
from cprec.data.synthetic import generate_synthetic

__all__ = ["SequenceDataset", "default_data_config", "generate_synthetic", "load_dataset", "load_sequences"]
