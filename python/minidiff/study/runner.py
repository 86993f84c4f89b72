"""One streaming pass of every model over the data, resumable chunk by chunk.

The examples of this process's shard (``DistContext.shard_range``) are cut into
chunks of ``batch_size * chunk_batches`` examples. For every batch of a chunk
each model that still needs the chunk runs once; its logits and final embedding
are kept for the chunk (the per-example outputs every prediction and distribution
metric is computed from) and its captured layers go straight into the CKA
accumulator of every (base, variant) pair it belongs to, then are dropped. Memory
is therefore O(batch x layers + pairs x layer-width^2) plus the per-example
outputs, never O(examples x layers).

After each chunk the models' chunk outputs and the pairs' cumulative accumulator
states are written to the cache (atomically, checksummed). A rerun skips every
chunk whose outputs and pair states are already there; an interrupted run thus
loses at most the chunk it was in. Finally the per-example outputs are gathered
across ranks in example order and the accumulators all-reduced
(:class:`~minidiff.distributed.DistContext`); single-process both are no-ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from minidiff.distributed import DistContext
from minidiff.study.cache import StudyCache, hash_json
from minidiff.study.capture import Member
from minidiff.study.characteristics import StatBatch, StatSetup, stats_for


@dataclass
class Pair:
    """Two models whose layers are compared by CKA (``a`` the reference)."""

    a: Member
    b: Member

    @property
    def name(self) -> str:
        return f"{self.a.name}~{self.b.name}"


@dataclass
class PassResult:
    """What one pass over a data set produced (complete, all ranks gathered)."""

    logits: dict[str, torch.Tensor] = field(default_factory=dict)      # member -> (N, C) float32
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # member -> (N, d) float32
    pair_stats: dict[str, dict[str, Any]] = field(default_factory=dict)    # pair -> stat name -> accumulator
    member_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # member -> stat name -> accumulator
    study_stats: dict[str, Any] = field(default_factory=dict)              # stat name -> accumulator (all members)
    member_order: list[str] = field(default_factory=list)                  # the members' order in study_stats
    rbf_layers: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # member -> first rows per layer
    layer_names: dict[str, list[str]] = field(default_factory=dict)
    forward_chunks: dict[str, int] = field(default_factory=dict)      # member -> chunks computed (not cached)

    @property
    def cka(self) -> dict[str, Any]:
        """pair -> CKAAccumulator (the ``"cka"`` pair statistic)."""
        return {p: st["cka"] for p, st in self.pair_stats.items() if "cka" in st}


def _batch_inputs(data: Any, start: int, stop: int) -> Any:
    return data.inputs[start:stop]


def probe_layers(member: Member, data: Any, token_mode: str, device: str) -> tuple[list[int], list[str]]:
    """Widths and names of a member's captured representations (one 2-example forward)."""
    n = min(4, len(data))
    member.append_embedding = None
    _, layers, emb = member.forward(_batch_inputs(data, 0, n), token_mode, device)
    names = list(member.layers)
    if len(layers) == len(names) + 1:
        if len(layers) >= 2 and layers[-2].shape == emb.shape and torch.allclose(layers[-2], emb, rtol=1e-5, atol=1e-6):
            member.append_embedding = False  # the head reads the last captured layer as it is
            layers = layers[:-1]
        else:
            member.append_embedding = True
            names.append("embedding")
    else:
        member.append_embedding = False
    member.info["layer_names"] = names
    return [int(t.shape[1]) for t in layers], names


def run_pass(members: list[Member], pairs: list[Pair], data: Any, *, cache: StudyCache, tag: str,
             batch_size: int, chunk_batches: int, token_mode: str, device: str = "cpu",
             ctx: DistContext | None = None, metrics: Any = None, characteristics: Sequence[str] = (),
             rbf_rows: int = 0, progress: bool = True,
             on_chunk: Callable[[int], None] | None = None) -> PassResult:
    """Run ``members`` over ``data`` once (resuming from the cache) and return the outputs.

    Parameters
    ----------
    members : models to run; ``pairs`` : which of them are compared layer by layer.
    data : ExampleSet
    cache : StudyCache
    tag : str
        Names the data set in cache keys and progress bars (``"eval"``, ``"ood"``).
    metrics : MetricsConfig, optional
        With ``characteristics``, decides which streaming statistics
        (:data:`minidiff.study.characteristics.STREAM_STATS`) are built and fed.
    characteristics : the characteristics measured on this pass (none for the OOD pass).
    rbf_rows : int
        Keep the first ``rbf_rows`` examples' layer representations (for the
        non-streaming RBF CKA); 0 keeps none.
    on_chunk : callable, optional
        Called with the chunk index after each chunk is stored (tests use it to
        simulate an interruption).
    """
    ctx = ctx or DistContext()
    n_total = len(data)
    chunk = batch_size * chunk_batches
    # shard boundaries on chunk boundaries: every rank runs the single-process batches
    start, stop = ctx.shard_range(n_total, align=chunk)
    chunks = [(s, min(s + chunk, stop)) for s in range(start, stop, chunk)]
    chars = tuple(characteristics) if metrics is not None else ()
    labelled = data.labels is not None
    linear = metrics is None or getattr(metrics, "cka_kernel", "linear") == "linear"
    pair_stats = stats_for(chars, labels=labelled, scope="pair", linear_cka=linear) if pairs else []
    member_stats = stats_for(chars, labels=labelled, scope="member")
    members_stats = stats_for(chars, labels=labelled, scope="members")
    capture = bool(pair_stats) or rbf_rows > 0
    fp = data.fingerprint()
    settings = {"data": fp, "token_mode": token_mode, "batch_size": batch_size, "chunk_batches": chunk_batches,
                "shard": [ctx.rank, ctx.world_size, start, stop], "capture": capture, "rbf_rows": rbf_rows}
    result = PassResult()

    widths: dict[str, list[int]] = {}
    for m in members:
        m.module.eval()
        if capture:
            widths[m.name], result.layer_names[m.name] = probe_layers(m, data, token_mode, device)
    mkey = {m.name: hash_json({"model": m.key, "layers": m.layers, "emb": m.embedding_module, **settings})[:32]
            for m in members}

    # pair statistics (layers): the only state not rebuilt from cached outputs, so it is cached per chunk
    accs: dict[str, tuple[dict[str, Any], str]] = {}
    done: dict[str, int] = {}
    for p in pairs if pair_stats else []:
        built = {st.name: st.build(StatSetup(metrics=metrics, widths_a=tuple(widths[p.a.name]),
                                             widths_b=tuple(widths[p.b.name]), device=device))
                 for st in pair_stats}
        pkey = hash_json({"a": mkey[p.a.name], "b": mkey[p.b.name], "estimator": metrics.cka_estimator,
                          "stats": sorted(built)})[:32]
        got = cache.load_tensors(f"pairs/{pkey}/state.safetensors")
        done[p.name] = 0
        if got is not None:
            try:
                for name, acc in built.items():
                    acc.load_state_dict({k.split(".", 1)[1]: v for k, v in got[0].items()
                                         if k.split(".", 1)[0] == name})
                done[p.name] = int(got[1]["chunks_done"])
            except (ValueError, KeyError):
                for acc in built.values():
                    acc.reset()
        accs[p.name] = (built, pkey)
        first = _batch_inputs(data, 0, min(batch_size, n_total))

        @functools.cache  # the pair's first-batch layers, computed once for all its statistics
        def first_layers(p: Pair = p) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            return p.a.forward(first, token_mode, device)[1], p.b.forward(first, token_mode, device)[1]

        for acc in built.values():
            # under torchrun: one shift on every rank (the single-process one) before accumulating
            ctx.agree_shift(acc, first_layers)
    # output statistics (logits): fed from each chunk's outputs, cached or fresh, so resuming
    # rebuilds them exactly from the cache
    out_stats: dict[str, dict[str, Any]] = {m.name: {} for m in members}
    all_stats: dict[str, Any] = {}

    def feed_outputs(c0: int, c1: int, logits: dict[str, torch.Tensor]) -> None:
        y = data.labels[c0:c1] if labelled else None
        for m in members:
            lg = logits[m.name]
            for st in member_stats:
                if st.name not in out_stats[m.name]:
                    out_stats[m.name][st.name] = st.build(StatSetup(metrics=metrics, num_classes=int(lg.shape[1])))
                st.feed(out_stats[m.name][st.name], StatBatch([lg], y, []))
        for st in members_stats:
            if st.name not in all_stats:
                all_stats[st.name] = st.build(StatSetup(metrics=metrics, num_models=len(members)))
            st.feed(all_stats[st.name], StatBatch([logits[m.name] for m in members], y, []))

    outs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m.name: [] for m in members}
    rbf: dict[str, list[list[torch.Tensor]]] = {m.name: [] for m in members}
    computed = {m.name: 0 for m in members}
    bar = tqdm(total=len(chunks) * len(members), desc=f"{tag}: models x chunks", unit="chunk",
               disable=not progress or not ctx.is_main, leave=False)
    for k, (c0, c1) in enumerate(chunks):
        cached: dict[str, dict[str, torch.Tensor]] = {}
        for m in members:
            got = cache.load_tensors(f"models/{mkey[m.name]}/chunk_{k:05d}.safetensors")
            if got is not None and int(got[1].get("rows", -1)) == c1 - c0:
                cached[m.name] = got[0]
        pending_pairs = [p for p in pairs if p.name in done and done[p.name] <= k]
        need = [m for m in members if m.name not in cached
                or any(p.a is m or p.b is m for p in pending_pairs)]
        fresh: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m.name: [] for m in need}
        fresh_rbf: dict[str, list[list[torch.Tensor]]] = {m.name: [] for m in need}
        for b0 in range(c0, c1, batch_size):
            b1 = min(b0 + batch_size, c1)
            x = _batch_inputs(data, b0, b1)
            reps: dict[str, list[torch.Tensor]] = {}
            for m in need:
                logits, layers, emb = m.forward(x, token_mode, device, capture=capture)
                fresh[m.name].append((logits.cpu(), emb.cpu()))
                reps[m.name] = layers
                if rbf_rows > b0:
                    fresh_rbf[m.name].append([t[: rbf_rows - b0].cpu() for t in layers])
            for p in pending_pairs:
                batch = StatBatch([], None, [reps[p.a.name], reps[p.b.name]])
                for st in pair_stats:
                    st.feed(accs[p.name][0][st.name], batch)
        chunk_logits: dict[str, torch.Tensor] = {}
        for m in members:
            if m.name in cached:
                t = cached[m.name]
                outs[m.name].append((t["logits"], t["embedding"]))
                chunk_logits[m.name] = t["logits"]
                if rbf_rows > c0:
                    nl = len(widths[m.name])
                    rbf[m.name].append([t[f"layer_{i}"] for i in range(nl)])
            else:
                lg = torch.cat([o[0] for o in fresh[m.name]])
                em = torch.cat([o[1] for o in fresh[m.name]])
                tensors = {"logits": lg, "embedding": em}
                if fresh_rbf[m.name]:
                    per_layer = [torch.cat(parts) for parts in zip(*fresh_rbf[m.name])]
                    tensors.update({f"layer_{i}": t for i, t in enumerate(per_layer)})
                    rbf[m.name].append(per_layer)
                cache.save_tensors(f"models/{mkey[m.name]}/chunk_{k:05d}.safetensors", tensors,
                                   {"rows": c1 - c0, "model": m.name, "first": c0})
                outs[m.name].append((lg, em))
                chunk_logits[m.name] = lg
                computed[m.name] += 1
            bar.update(1)
        if len({int(t.shape[1]) for t in chunk_logits.values()}) == 1:
            feed_outputs(c0, c1, chunk_logits)
        # (models with different output widths are reported by the study after the pass)
        for p in pending_pairs:
            built, pkey = accs[p.name]
            state = {f"{name}.{key}": v for name, acc in built.items() for key, v in acc.state_dict().items()}
            cache.save_tensors(f"pairs/{pkey}/state.safetensors", state, {"chunks_done": k + 1})
            done[p.name] = k + 1
        if on_chunk is not None:
            on_chunk(k)
    bar.close()

    for m in members:
        lg = torch.cat([o[0] for o in outs[m.name]]) if outs[m.name] else torch.empty(0)
        em = torch.cat([o[1] for o in outs[m.name]]) if outs[m.name] else torch.empty(0)
        result.logits[m.name] = ctx.gather_in_order(lg)
        result.embeddings[m.name] = ctx.gather_in_order(em)
        if rbf[m.name] or (rbf_rows > 0 and ctx.is_distributed):  # rows may lie on several ranks
            local = [torch.cat(parts) for parts in zip(*rbf[m.name])] or [torch.empty(0)] * len(widths[m.name])
            result.rbf_layers[m.name] = [ctx.gather_in_order(t) for t in local]
    for p in pairs:
        if p.name in accs:
            result.pair_stats[p.name] = {name: ctx.sync(acc) for name, acc in accs[p.name][0].items()}
    result.member_stats = {m: {name: ctx.sync(acc) for name, acc in st.items()} for m, st in out_stats.items()}
    result.study_stats = {name: ctx.sync(acc) for name, acc in all_stats.items()}
    result.member_order = [m.name for m in members]
    result.forward_chunks = computed
    return result
