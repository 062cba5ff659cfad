"""Serving a trained model from an export directory (``python -m cprec.export RUN OUT``).

Imports only the model package: never training, evaluation, data loading or devices.

- ``Recommender``: raw-id top-n (``exclude_seen``, ``max_clusters``), candidate ``score``, sessions.
- ``Session`` / ``SessionStore``: per-user incremental state, O(layers) per event, LRU-bounded.
- ``artifact``: the export directory (safetensors + JSON); ``quantize``: row-wise int8 item tables;
  ``incremental``: the conv stack's per-layer queues (Fast WaveNet generation).
"""
from cprec.serve.artifact import Artifact, load_artifact
from cprec.serve.recommender import Recommendation, Recommender, RequestError, Scores, Session, SessionStore

__all__ = ["Artifact", "Recommendation", "Recommender", "RequestError", "Scores", "Session", "SessionStore",
           "load_artifact"]
