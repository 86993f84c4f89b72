"""A tiny causal language model that minidiff trains itself, offline, in about a minute.

What it is: a transformers ``LlamaForCausalLM`` (RMSNorm, rotary positions, SwiGLU
MLP; every projection an ``nn.Linear``, so minidiff's int8 / int4 / pruning recipes
apply to it as to any decoder) with a few layers of small width, and its own
byte-level BPE tokenizer trained with the ``tokenizers`` library on the same text
and wrapped as a ``transformers.PreTrainedTokenizerFast`` (it adds a BOS token
like Llama's tokenizers do, so the llama.cpp scoring rule's BOS substitution is
exercised).

The text: the English chatterbot-corpus conversations (installed from PyPI as
``chatterbot-corpus``, about 200 kB of real question/answer text; the only
real English prose that installs offline among the project's dependencies).
Every 10th conversation is held out (:func:`minidiff.lm.windows.chatterbot_text`
``split="eval"``): the model never trains on the text a study scores.

Training: next-token cross-entropy on random ``n_ctx``-token windows of the
training stream (BOS in position 0, as scored), AdamW with linear warm-up and
cosine decay, a fixed number of steps, seeded (the same seed gives the same
weights on the same torch build). The trained model and tokenizer are saved
under ``cache_dir/built/tinylm-<hash>/`` (``save_pretrained`` layout; the hash
covers the settings and the training text), so a rerun loads instead of training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

BOS = "<|bos|>"
EOS = "<|eos|>"


@dataclass(frozen=True)
class TinyLMConfig:
    """Settings of the tiny LM (the defaults: 0.53 M parameters, 160 steps of 8 x 128 tokens)."""

    vocab_size: int = 1024
    hidden: int = 96
    layers: int = 3
    heads: int = 3
    intermediate: int = 256
    n_ctx: int = 128
    steps: int = 160
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    language: str = "english"

    @classmethod
    def quick(cls) -> "TinyLMConfig":
        """A few seconds of training: enough to learn frequent words, for CI."""
        return cls(vocab_size=512, hidden=64, layers=2, heads=2, intermediate=192, n_ctx=64, steps=50,
                   batch_size=8, warmup=5)


def train_tokenizer(text: str, vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``text``, as a ``PreTrainedTokenizerFast``
    that adds BOS when encoding with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


def build_model(cfg: TinyLMConfig, vocab_size: int, bos_id: int, eos_id: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=max(2 * cfg.n_ctx, 256), tie_word_embeddings=False,
                       bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                       rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(conf)


def _cosine(step: int, cfg: TinyLMConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def train_tiny_lm(cfg: TinyLMConfig | None = None, text: str | None = None,
                  progress: bool = False) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Train the tiny LM; returns ``(model in eval mode, tokenizer, info)``.

    ``info`` holds the training time, steps, final training loss and the
    training text's size.
    """
    from .windows import chatterbot_text, encode

    cfg = cfg or TinyLMConfig()
    text = chatterbot_text(cfg.language, "train") if text is None else text
    t0 = time.perf_counter()
    tok = train_tokenizer(text, cfg.vocab_size)
    ids = torch.tensor(encode(tok, text), dtype=torch.int64)
    if ids.numel() < 2 * cfg.n_ctx:
        raise ValueError(f"the training text has only {ids.numel()} tokens; need at least {2 * cfg.n_ctx}")
    model = build_model(cfg, len(tok), tok.bos_token_id, tok.eos_token_id)
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg))
    model.train()
    loss_v = float("nan")
    losses: list[float] = []
    offsets = torch.arange(cfg.n_ctx)
    for step in range(cfg.steps):
        starts = torch.randint(0, ids.numel() - cfg.n_ctx, (cfg.batch_size,), generator=gen)
        x = ids[starts[:, None] + offsets]
        x[:, 0] = tok.bos_token_id
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = float(out.loss.detach())
        losses.append(loss_v)
        if progress and (step % 50 == 0 or step == cfg.steps - 1):
            print(f"  tiny LM step {step + 1}/{cfg.steps}: loss {loss_v:.3f}", flush=True)
    model.eval()
    info = {"train_s": time.perf_counter() - t0, "steps": cfg.steps, "final_loss": loss_v,
            "loss_last10": sum(losses[-10:]) / len(losses[-10:]), "train_tokens": int(ids.numel()),
            "train_chars": len(text), "parameters": sum(p.numel() for p in model.parameters()),
            "config": asdict(cfg)}
    return model, tok, info


def cache_key(cfg: TinyLMConfig, text: str) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(hashlib.sha256(text.encode("utf-8")).digest())
    h.update(f"{torch.__version__}:{transformers.__version__}:{tokenizers.__version__}".encode())
    return h.hexdigest()


def load_or_train_tiny_lm(cache_dir: str | os.PathLike | None, cfg: TinyLMConfig | None = None,
                          text: str | None = None, progress: bool = False
                          ) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """:func:`train_tiny_lm`, cached under ``cache_dir/built/tinylm-<hash>/``.

    The folder holds ``save_pretrained`` output of the model and tokenizer and an
    ``info.json``; it is written to a temporary folder and renamed into place, so
    an interrupted run never leaves a half-written model that a rerun would load.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from .windows import chatterbot_text

    cfg = cfg or TinyLMConfig()
    text = chatterbot_text(cfg.language, "train") if text is None else text
    if cache_dir is None:
        return train_tiny_lm(cfg, text, progress)
    folder = Path(cache_dir) / "built" / f"tinylm-{cache_key(cfg, text)[:20]}"
    if (folder / "info.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
        model.eval()
        info = json.loads((folder / "info.json").read_text())
        info["cached"] = True
        return model, tok, info
    model, tok, info = train_tiny_lm(cfg, text, progress)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    info["cached"] = False
    return model, tok, info
