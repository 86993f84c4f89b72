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


@pytest.fixture(scope="module")
def digits_family():
    """A digits MLP trained briefly (150 evaluation examples) with its int8 and 80%-pruned
    copies and a distilled student of another architecture (one hidden layer): the
    models of the localization and layer-swap study tests. Built once per module."""
    from minidiff.compress import distill, prune, quantize
    from minidiff.compress.training import seeded, train
    from minidiff.data import load_builtin
    from minidiff.models import make_mlp
    torch.set_num_threads(1)
    tr, te = load_builtin("digits").split(0.5, seed=0)
    te = te.subset(range(150))
    with seeded(0):
        base = make_mlp(64, [32, 16], 10)
    train(base, (tr.inputs, tr.labels), epochs=6, lr=1e-2, batch_size=64, seed=0)
    base.eval()
    return {"base": base, "data": te,
            "variants": {"int8": quantize(base, "int8").model.eval(),
                         "prune-80": prune(base, sparsity=0.8, scope="global").model.eval(),
                         "small": distill(base, (tr.inputs, tr.labels), hidden=[16], epochs=2, seed=0).model.eval()}}


def _null_paths(obj, path=""):
    if obj is None:
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _null_paths(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _null_paths(v, f"{path}[{i}]")


@pytest.fixture
def null_paths():
    """``null_paths(obj)`` -> the paths (``.key[i]``) of every ``None`` in a JSON-like
    object: results.json must hold a number or a reason wherever a value is defined."""
    return lambda obj: list(_null_paths(obj))


# ---- language-model tests: one text, one tokenizer, one small decoder family --------------
@pytest.fixture(scope="session")
def text() -> str:
    """The chatterbot evaluation conversations (real text that installs offline)."""
    from minidiff.lm.windows import chatterbot_text
    return chatterbot_text("english", "eval")


@pytest.fixture(scope="session")
def tok(text):
    """A 300-token byte-level BPE tokenizer trained on ``text``."""
    from minidiff.lm.tinylm import train_tokenizer
    return train_tokenizer(text, 300)


@pytest.fixture(scope="session")
def tiny_lm():
    """``tiny_lm(tok, hidden=32, seed=0)``: a 2-layer Llama-architecture decoder for ``tok``
    with a sharpened random output head (a random init predicts nearly uniformly, which
    would make top-1 and KLD statistics trivial)."""
    from minidiff.lm.tinylm import TinyLMConfig, build_model

    def make(tok, hidden: int = 32, seed: int = 0):
        m = build_model(TinyLMConfig(hidden=hidden, layers=2, heads=2, intermediate=64, seed=seed), len(tok),
                        tok.bos_token_id, tok.eos_token_id)
        with torch.no_grad():
            m.lm_head.weight.mul_(40.0)
        return m.eval()
    return make
