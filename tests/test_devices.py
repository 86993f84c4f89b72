"""Tensors and devices that hold no usable data here: every public entry point answers
a 'meta' tensor or model (shapes, no values) and a CUDA device on a machine without
CUDA with a ValueError that says so, never a RuntimeError from deep inside torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import minidiff
from minidiff import compress, metrics
from minidiff.data import ExampleSet


def _m(*shape, dtype=torch.float32):
    return torch.full(shape, 0.25, dtype=dtype, device="meta")


def _i(*shape):
    return torch.zeros(shape, dtype=torch.int64, device="meta")


def _meta_mlp():
    return nn.Sequential(nn.Linear(4, 3)).to("meta")


def _data():
    g = torch.Generator().manual_seed(0)
    return ExampleSet("d", "tabular", torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g),
                      ["a", "b", "c"])


META_CASES = {
    "cka": lambda: minidiff.cka(_m(8, 3), _m(8, 3)),
    "cka rbf": lambda: minidiff.cka(_m(8, 3), _m(8, 3), kernel="rbf"),
    "cka_matrix": lambda: minidiff.cka_matrix([_m(8, 3)], [_m(8, 3)]),
    "similarity_matrix": lambda: minidiff.similarity_matrix([_m(8, 3)], [_m(8, 3)], measure="cca"),
    "layer_error": lambda: minidiff.layer_error([_m(8, 3)], [_m(8, 3)]),
    "token_divergence": lambda: minidiff.token_divergence(_m(4, 5), _m(4, 5)),
    "divergence_matrix": lambda: minidiff.divergence_matrix(_m(2, 4, 3)),
    "disagreement_matrix": lambda: minidiff.disagreement_matrix(_i(2, 4)),
    "flip_matrix": lambda: minidiff.flip_matrix(_i(2, 4), _i(4)),
    "pie_mask": lambda: minidiff.pie_mask(_i(2, 4), _i(2, 4)),
    "CKAAccumulator.update": lambda: minidiff.CKAAccumulator([3], [3]).update(_m(8, 3), _m(8, 3)),
    "LayerErrorAccumulator.update": lambda: minidiff.LayerErrorAccumulator([3]).update([_m(8, 3)], [_m(8, 3)]),
    "TokenDivergenceAccumulator.update": lambda: minidiff.TokenDivergenceAccumulator().update(_m(4, 5), _m(4, 5),
                                                                                            _i(4)),
    "metrics.accuracy": lambda: metrics.accuracy(_i(8), _i(8)),
    "metrics.ece": lambda: metrics.ece(_m(8, 4), _i(8)),
    "metrics.knn_overlap": lambda: metrics.knn_overlap(_m(8, 3), _m(8, 3), k=2),
    "metrics.ks_shift": lambda: metrics.ks_shift(_m(8), _m(8)),
    "metrics.bootstrap_mean_ci": lambda: metrics.bootstrap_mean_ci(_m(8)),
    "metrics.ood_threshold": lambda: metrics.ood_threshold(_m(8)),
    "metrics.layer_correspondence": lambda: metrics.layer_correspondence(_m(3, 3)),
    "metrics.to_jsonable": lambda: metrics.to_jsonable({"x": _m(2)}),
    "compress.quantize": lambda: compress.quantize(_meta_mlp(), "int8"),
    "compress.prune": lambda: compress.prune(_meta_mlp(), sparsity=0.5),
    "layer_swap": lambda: minidiff.layer_swap(_meta_mlp(), _meta_mlp(), [torch.zeros(2, 4)]),
    "Study": lambda: minidiff.Study(_meta_mlp(), {"v": _meta_mlp()}, _data(), progress=False),
    "models.load_model(device='meta')": lambda: minidiff.models.load_model(nn.Linear(2, 2), device="meta"),
    "CKAAccumulator(device='meta')": lambda: minidiff.CKAAccumulator([3], [3], device="meta"),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_meta_inputs_get_a_clear_error(case):
    with pytest.raises(ValueError, match="meta"):
        META_CASES[case]()


CUDA_CASES = {
    "Study": lambda: minidiff.Study(nn.Linear(4, 3), {"v": nn.Linear(4, 3)}, _data(), progress=False, device="cuda"),
    "CKAAccumulator": lambda: minidiff.CKAAccumulator([3], [3], device="cuda"),
    "LayerErrorAccumulator": lambda: minidiff.LayerErrorAccumulator([3], device="cuda"),
    "Accumulator.to": lambda: minidiff.LayerErrorAccumulator([3]).to("cuda"),
    "load_variant": lambda: minidiff.load_variant("/nonexistent", device="cuda"),
    "models.load_model": lambda: minidiff.models.load_model(nn.Linear(2, 2), device="cuda"),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("case", sorted(CUDA_CASES))
def test_cuda_on_a_machine_without_it_gets_a_clear_error(case):
    with pytest.raises(ValueError, match="no usable CUDA device.*use 'cpu'"):
        CUDA_CASES[case]()
