"""Test configuration.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so
that on a machine without CUDA every Triton kernel runs (on CPU tensors) under
the interpreter. On a GPU machine the kernels compile for real (the
interpreter-only tests then skip and the ``gpu`` tests run); force either mode
by setting TRITON_INTERPRET yourself.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch  # importing torch does not import triton

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # property-based tests: a fast default, `--hypothesis-profile=long` for local soak runs
    from hypothesis import HealthCheck, settings

    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("fast", max_examples=20, derandomize=True, **_common)
    settings.register_profile("long", max_examples=2000, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: intra-op threads only add
    synchronisation cost there (and stall badly on a busy machine). Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
