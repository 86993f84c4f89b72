"""Representation similarity between the layers of two models.

Centered kernel alignment (Kornblith et al. 2019, "Similarity of Neural Network
Representations Revisited") with the linear and RBF kernels, streamed exactly over
any number of samples, plus the second-order measures that the same streamed
statistics give without another pass (CCA, SVCCA, orthogonal Procrustes, linear
regression, RV), and per-layer error between matched layers. The mathematics, with
citations, is in ``docs/similarity.md``.

Modules
-------
``inputs``       validation shared by everything below
``hsic``         HSIC estimators from streamed sums, and the in-memory feature and Gram forms
``accumulator``  :class:`CKAAccumulator`: one pass, every layer pair, shards merge
``measures``     CCA, SVCCA, Procrustes, regression and RV from centred covariances
``functional``   :func:`cka`, :func:`cka_matrix`, :func:`similarity_matrix` (in memory, float64)
``memory``       :func:`cka_state_bytes`: the accumulator's memory formula
``split``        :class:`LayerSplitCKA`: model b's layers split across ranks
``layer_error``  :func:`layer_error`, :class:`LayerErrorAccumulator` (relative error, SQNR, cosine)

CKA estimators
--------------
``"biased"``:   HSIC_0 = tr(K H L H) / (n - 1)^2, ``H = I - 11^T / n`` (Gretton et al. 2005).
``"unbiased"``: HSIC_1 of Song et al. (2012), needs n >= 4; it can be negative and is never clamped.
``"minibatch"``: (accumulator only) Nguyen et al. (2021): HSIC_1 averaged over batches,
                then the ratio; depends on the batch size.
"""

from __future__ import annotations

from minidiff.similarity.accumulator import FLUSH_SAMPLES, CKAAccumulator
from minidiff.similarity.functional import cka, cka_matrix, similarity_matrix
from minidiff.similarity.inputs import ACC_ESTIMATORS, ESTIMATORS, KERNELS
from minidiff.similarity.layer_error import LayerErrorAccumulator, layer_error
from minidiff.similarity.measures import MEASURES
from minidiff.similarity.memory import cka_state_bytes
from minidiff.similarity.split import LayerSplitCKA

__all__ = ["ACC_ESTIMATORS", "CKAAccumulator", "ESTIMATORS", "FLUSH_SAMPLES", "KERNELS", "LayerErrorAccumulator",
           "LayerSplitCKA", "MEASURES", "cka", "cka_matrix", "cka_state_bytes", "layer_error",
           "similarity_matrix"]
