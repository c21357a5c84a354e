"""What a checkpoint of no known family holds, told from its keys and shapes alone: how many norm
layers, whether they track running statistics (BatchNorm), and whether the network is a
transformer (attention weights), whose norms are LayerNorm. The import's refusal line uses it to
say what was found and whether AC-Norm could apply at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

#: key fragments of attention layers and token embeddings (ViT, Swin, SAM, EVA / Primus)
TRANSFORMER_MARKERS = (".attn.", ".qkv.", "self_attn", ".attention.", "pos_embed", "cls_token", "rel_pos")


@dataclass(frozen=True)
class NormCensus:
    tensors: int
    #: layers with a 1-D weight and bias of equal size (norms; conv biases have no 1-D weight)
    affine_norms: int
    #: of those, layers with running statistics (BatchNorm)
    batch_norms: int
    #: an attention key, if any
    attention_key: str | None

    @property
    def transformer_only(self) -> bool:
        """A transformer whose norms are all of LayerNorm type (no BatchNorm; no conv-norm stages)."""
        return self.attention_key is not None and self.batch_norms == 0

    def describe(self) -> str:
        if self.transformer_only:
            return (f"a transformer (attention weights such as '{self.attention_key}') whose {self.affine_norms} "
                    "norm layer(s) are of LayerNorm type, with no BatchNorm")
        return (f"{self.tensors} tensors with {self.affine_norms} norm-like layer(s) ({self.batch_norms} with running "
                "statistics, i.e. BatchNorm)")


def largest_state_dict(checkpoint: Any) -> Mapping:
    """The mapping with the most tensors: the checkpoint itself or a value of it (two levels deep)."""
    candidates = [checkpoint] if isinstance(checkpoint, Mapping) else []
    for value in list(candidates):
        candidates += [v for v in value.values() if isinstance(v, Mapping)]
    for value in list(candidates[1:]):
        candidates += [v for v in value.values() if isinstance(v, Mapping)]
    count = [sum(isinstance(v, torch.Tensor) for v in c.values()) for c in candidates]
    return candidates[count.index(max(count))] if candidates and max(count) else {}


def census(checkpoint: Any) -> NormCensus:
    state = {k: v for k, v in largest_state_dict(checkpoint).items()
             if isinstance(k, str) and isinstance(v, torch.Tensor)}
    norms = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dim() == 1
             and isinstance(state.get(k[: -len(".weight")] + ".bias"), torch.Tensor)
             and state[k[: -len(".weight")] + ".bias"].shape == v.shape]
    batch = sum(1 for n in norms if n + ".running_mean" in state)
    attention = next((k for m in TRANSFORMER_MARKERS for k in state if m in "." + k), None)
    return NormCensus(len(state), len(norms), batch, attention)
