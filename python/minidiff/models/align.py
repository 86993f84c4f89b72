"""Which layer of a variant corresponds to which layer of its base.

Three rules, in order:

1. an explicit ``layer_map`` (base layer -> variant layer) is used as given,
   after checking that every name exists on its side;
2. when the variant has every base layer under the same module name (shared
   architecture: quantized, pruned, cast or ONNX-exported copies, whose wrappers
   name layers after the torch modules), layers are matched by name;
3. otherwise, when both sides list the same number of layers (e.g. the
   ``hidden_states`` of two architectures of equal depth, a GGUF model against
   its transformers original), by position (hidden-state index).

Anything else is a ``ValueError`` that lists both sides' layers, so the user can
write a ``layer_map``. Half-precision variants get the base's list: dtype never
changes which layers exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["LayerAlignment", "align_layers"]


@dataclass
class LayerAlignment:
    """Matched layer pairs and how they were matched.

    Attributes
    ----------
    pairs : list of (base_layer, variant_layer)
    rule : str
        ``"layer_map"``, ``"name"`` or ``"index"``.
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    rule: str = "name"

    @property
    def base(self) -> list[str]:
        return [a for a, _ in self.pairs]

    @property
    def variant(self) -> list[str]:
        return [b for _, b in self.pairs]


def _listing(base: Sequence[str], variant: Sequence[str]) -> str:
    def short(xs: Sequence[str]) -> str:
        xs = list(xs)
        return str(xs if len(xs) <= 24 else xs[:12] + ["..."] + xs[-6:])
    return f"base layers ({len(base)}): {short(base)}; variant layers ({len(variant)}): {short(variant)}"


def align_layers(base_layers: Sequence[str], variant_layers: Sequence[str], *,
                 layer_map: Mapping[str, str] | None = None,
                 variant_modules: Sequence[str] | None = None) -> LayerAlignment:
    """Match base layers with variant layers (see module docstring).

    Parameters
    ----------
    base_layers
        The base's captured layers, in order.
    variant_layers
        The variant's own layer list (e.g. its automatic choice), in order.
    layer_map
        Optional explicit base layer -> variant layer mapping.
    variant_modules
        All module names of the variant; when given, rule 2 also applies when the
        variant's own list differs but it has every base layer by name.

    Raises
    ------
    ValueError
        Unknown names in ``layer_map``, or no rule applies; the message lists both
        sides' layers.
    """
    base = list(base_layers)
    var = list(variant_layers)
    if not base:
        raise ValueError("the base has no layers to align; " + _listing(base, var))
    known_var = set(var) | set(variant_modules or ())
    if layer_map:
        bad_a = [a for a in layer_map if a not in base]
        bad_b = [b for b in layer_map.values() if b not in known_var]
        if bad_a or bad_b:
            raise ValueError(f"layer_map names unknown layers (base: {bad_a}, variant: {bad_b}); "
                             + _listing(base, var))
        return LayerAlignment(pairs=[(a, b) for a, b in layer_map.items()], rule="layer_map")
    if all(a in known_var for a in base):
        return LayerAlignment(pairs=[(a, a) for a in base], rule="name")
    if len(base) == len(var):
        return LayerAlignment(pairs=list(zip(base, var)), rule="index")
    raise ValueError("cannot match the variant's layers with the base's: the names differ and the counts "
                     f"differ; give a layer_map (base layer -> variant layer). {_listing(base, var)}")
