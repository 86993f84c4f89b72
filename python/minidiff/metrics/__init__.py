"""The metrics of the study, grouped by the characteristic they measure.

1. Prediction errors (:mod:`.prediction`, :mod:`.calibration`, :mod:`.population`):
   accuracy with bootstrap CI, flips/churn/error Jaccard, McNemar, KL/JS
   summaries, ECE/Brier/reliability bins, per-class impact with Welch's t-test,
   PIE/CIE and accuracy on PIEs.
2. Data representation (:mod:`.neighbors`): kNN overlap, layer correspondence
   from a CKA matrix (the CKA itself is :func:`minidiff.cka_matrix`).
3. Data distribution (:mod:`.ood`, :mod:`.distribution`): deep-kNN OOD flags and
   their agreement, confidence/entropy KS shift, predicted-class shift.

Plain functions on tensors/arrays, validated (ValueError naming the problem).
Functions that need labels raise :class:`MetricSkipped` when given ``None``.
Result dataclasses have ``to_dict()`` for JSON. Formulas and citations:
``python/minidiff/metrics/README.md`` and each docstring.
"""

from ._checks import MetricSkipped, Result, to_jsonable
from .calibration import (DEFAULT_BINS, Calibration, CalibrationAccumulator, CalibrationChange, ReliabilityBins,
                          brier, calibration, calibration_change, ece, reliability_bins)
from .distribution import (ClassHistogramAccumulator, ClassShift, KSResult, OutputShift, confidence, entropy,
                           ks_shift, output_shift, predicted_class_shift)
from .neighbors import KNNOverlap, LayerCorrespondence, knn_indices, knn_overlap, layer_correspondence
from .ood import OODAgreement, OODResult, knn_ood_scores, ood_agreement, ood_detect, ood_threshold
from .population import (ClassImpact, PIEAccuracy, PIESummary, accuracy_on_pie, class_impact, per_class_recall,
                         pie_summary)
from .prediction import (AccuracyCI, DivergenceSummary, FlipSummary, McNemarResult, accuracy, accuracy_ci,
                         accuracy_difference_ci, bootstrap_mean_ci, churn, divergence_summary, flips, mcnemar, per_example_divergence)

__all__ = [
    "MetricSkipped", "Result", "to_jsonable",
    # 1. prediction errors
    "accuracy", "bootstrap_mean_ci", "accuracy_ci", "accuracy_difference_ci", "AccuracyCI", "churn", "flips", "FlipSummary",
    "mcnemar", "McNemarResult", "per_example_divergence", "divergence_summary", "DivergenceSummary",
    "DEFAULT_BINS", "calibration", "ece", "brier", "reliability_bins", "calibration_change", "Calibration",
    "CalibrationChange", "ReliabilityBins", "CalibrationAccumulator",
    "per_class_recall", "class_impact", "ClassImpact", "pie_summary", "PIESummary", "accuracy_on_pie", "PIEAccuracy",
    # 2. representation
    "knn_indices", "knn_overlap", "KNNOverlap", "layer_correspondence", "LayerCorrespondence",
    # 3. distribution
    "knn_ood_scores", "ood_threshold", "ood_detect", "OODResult", "ood_agreement", "OODAgreement",
    "confidence", "entropy", "ks_shift", "KSResult", "output_shift", "OutputShift", "predicted_class_shift",
    "ClassShift", "ClassHistogramAccumulator",
]
