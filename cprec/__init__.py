"""cprec: CpRec compression of NextItNet sequential recommenders in JAX/Flax."""
from cprec.embedding import BlockwiseEmbedding
from cprec.full_softmax import FullSoftmax
from cprec.model import NextItNet
from cprec.tree_softmax import BlockwiseSoftmax

__all__ = ["BlockwiseEmbedding", "BlockwiseSoftmax", "FullSoftmax", "NextItNet"]
