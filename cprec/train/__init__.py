"""Training: the loop, the optimizer and train state, micro-batching, batching and metric writers."""
from cprec.train.loop import TrainingDiverged, train_and_evaluate
from cprec.train.step import make_optimizer, make_train_step, new_train_state

__all__ = ["TrainingDiverged", "make_optimizer", "make_train_step", "new_train_state", "train_and_evaluate"]
