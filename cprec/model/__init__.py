"""The model: NextItNet and CpRec's layers, with the builder from a config.

Imports nothing from training, evaluation, devices or data loading (tests/test_layout.py holds
this), so a server can load a model without the training stack.
"""
from cprec.model.builder import build_model, init_params
from cprec.model.full_softmax import FullSoftmax
from cprec.model.nextitnet import NextItNet
from cprec.model.output import OutputLayer
from cprec.model.sampled_softmax import Negatives, SampledSoftmax
from cprec.model.tables import BlockwiseEmbedding, ItemTable, make_table
from cprec.model.tree_softmax import BlockwiseSoftmax

__all__ = ["BlockwiseEmbedding", "BlockwiseSoftmax", "FullSoftmax", "ItemTable", "Negatives", "NextItNet", "OutputLayer",
           "SampledSoftmax", "build_model", "init_params", "make_table"]
