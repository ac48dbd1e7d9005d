"""Evaluation: feature extraction, weighted kNN monitor and linear probe."""

from mona_sfl.eval.knn import extract_features, knn_accuracy, knn_predict
from mona_sfl.eval.linear import ProbeResult, cosine_lr, linear_probe

__all__ = [
    "extract_features",
    "knn_predict",
    "knn_accuracy",
    "ProbeResult",
    "linear_probe",
    "cosine_lr",
]
