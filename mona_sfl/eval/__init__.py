"""Evaluation: feature extraction, weighted kNN monitor, linear probe, the run's monitor, and client-front statistics.

This package face holds the vocabulary (:data:`KNN_FEATURES`) and imports nothing heavy.
"""

from __future__ import annotations

from mona_sfl.registry import Choices, lazy_exports

#: ``eval.knn_features``: the kNN monitor's features, the projector output (reference) or the pooled backbone.
KNN_FEATURES = Choices("eval.knn_features", ("projector", "backbone"))

_LAZY = {
    "extract_features": "knn",
    "knn_predict": "knn",
    "knn_accuracy": "knn",
    "stratified_subset": "knn",
    "ProbeResult": "linear",
    "linear_probe": "linear",
    "cosine_lr": "linear",
    "Monitor": "monitor",
    "FrontStats": "front",
    "activation_stats": "front",
    "encode_front": "front",
    "front_knn": "front",
    "inspect_run": "front",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["KNN_FEATURES", *_LAZY]
