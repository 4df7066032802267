"""Rotary-embedding arithmetic for re-positioning cached keys.

A bounded cache keeps keys of tokens that were far apart and puts them side by side. To position
them by *slot* (StreamingLLM-style), the cache stores keys without rotation and rotates them on
every read to the slot positions the current query expects. The rotation must be the model's own
(same ``inv_freq``, which already folds in linear/llama3/yarn frequency scaling) but *unscaled*:
the model's ``attention_scaling`` is already inside the keys it hands over and must not be applied
twice. Only the rotate-half convention (Llama, Qwen, Mistral, Gemma, Phi-3) is used by the families
we support.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Rotator", "rotate_half", "find_rotary_embedding", "check_supported_model", "layer_rotators"]

# RoPE variants whose frequencies change at run time with the sequence length: the cache cannot
# re-rotate stored keys consistently with them.
_RUNTIME_ROPE_TYPES = ("dynamic", "longrope")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_rotary_embedding(model: nn.Module) -> nn.Module | None:
    """The module holding the model's ``inv_freq`` (usually ``model.model.rotary_emb``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is not None and _frequencies(rotary):
        return rotary
    for _, module in model.named_modules():
        if _frequencies(module):
            return module
    return None


def _frequencies(module) -> dict[str, torch.Tensor]:
    """``inv_freq`` tensors a rotary module holds: ``{"": inv_freq}`` or one per layer type.

    Models mixing sliding-window and global layers (Gemma 3) keep one set of frequencies per layer
    type, named ``<layer_type>_inv_freq`` (e.g. ``sliding_attention_inv_freq``).
    """
    found = {}
    for name in dir(module) if isinstance(module, nn.Module) else ():
        if name == "inv_freq" or name.endswith("_inv_freq"):
            value = getattr(module, name, None)
            if isinstance(value, torch.Tensor):
                found[name[: -len("_inv_freq")] if name != "inv_freq" else ""] = value
    return found


def layer_rotators(model: nn.Module, rotary: nn.Module) -> list["Rotator"]:
    """One ``Rotator`` per decoder layer, with the frequencies that layer's attention uses.

    Layers of the same type share one ``Rotator`` (and so one cos/sin table per step).
    """
    config = _text_config(model.config)
    frequencies = _frequencies(rotary)
    layer_types = getattr(config, "layer_types", None) or ["" for _ in range(int(config.num_hidden_layers))]
    shared: dict[str, Rotator] = {}
    rotators = []
    for layer_type in layer_types:
        key = layer_type if layer_type in frequencies else ""
        if key not in frequencies:
            raise ValueError(
                f"model={type(model).__name__}: no rotary frequencies for layer type {layer_type!r} "
                f"(found {sorted(frequencies)}); lacache cannot re-position this model's keys"
            )
        if key not in shared:
            shared[key] = Rotator(frequencies[key].detach().to(torch.float32).clone())
        rotators.append(shared[key])
    return rotators


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict):
        if "rope_type" in params or "type" in params:
            return str(params.get("rope_type", params.get("type")))
        # per-layer-type parameters (e.g. Gemma 3): any runtime type among them counts
        for value in params.values():
            if isinstance(value, dict) and value.get("rope_type") in _RUNTIME_ROPE_TYPES:
                return str(value["rope_type"])
    return "default"


def check_supported_model(model: nn.Module, positions: str) -> nn.Module:
    """Refuse, with one clear message, models a slot-positioned cache cannot serve; return the rotary module."""
    config = _text_config(model.config)
    name = type(model).__name__
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        raise ValueError(
            f"model={name} uses multi-head latent attention (MLA), whose cached latents carry no per-key "
            "rotation lacache can re-position; use a grouped/multi-head attention model (e.g. Llama, Qwen2)"
        )
    rotary = find_rotary_embedding(model)
    if rotary is None:
        raise ValueError(
            f"model={name} has no rotary position embedding (no module with `inv_freq`); lacache's caches "
            "re-position keys by rotation and support RoPE decoder-only models such as Llama, Qwen2 or Mistral"
        )
    rope_type = _rope_type(config)
    if positions == "shift" and rope_type in _RUNTIME_ROPE_TYPES:
        raise ValueError(
            f"model={name} uses rope_type={rope_type!r}, whose frequencies change with the sequence length, so "
            "stored keys cannot be re-positioned consistently; pass positions='original' (no position shift)"
        )
    return rotary


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Turn keys ``x`` by the angles whose ``cos``/``sin`` are given, rotate-half style; returns ``x``'s dtype.

    The one rotation both backends use: the transformers cache (``Rotator``, keys ``[B, H, n, D]``,
    angles ``[B, 1, n, half]``) and the vLLM worker (keys ``[n, heads, D]``, angles built from vLLM's
    ``cos_sin_cache`` as ``[n, 1, half]``). Any layout works where the angles broadcast against
    ``x[..., :half]``, ``half = cos.shape[-1]``. ``inverse`` turns by the opposite angles.

    Only the first ``2 * half`` features rotate (partial-rotary models leave the rest alone).
    Half-precision inputs are rotated in float32 and rounded once, so un-rotating and re-rotating a
    key never accumulates drift. Float32 inputs take a fused path (four kernels writing straight
    into the output) since the transformers cache runs this for every layer at every step.
    """
    h = cos.shape[-1]
    out = torch.empty_like(x)
    if inverse:
        sin = -sin
    if x.dtype == torch.float32 and not torch.compiler.is_compiling():  # out= on views breaks graphs
        x1, x2 = x[..., :h], x[..., h : 2 * h]
        o1, o2 = out[..., :h], out[..., h : 2 * h]
        torch.mul(x1, cos, out=o1)
        o1.addcmul_(x2, sin, value=-1.0)
        torch.mul(x2, cos, out=o2)
        o2.addcmul_(x1, sin)
    else:
        xf = x[..., : 2 * h].to(torch.float32)
        x1, x2 = xf[..., :h], xf[..., h:]
        out[..., :h] = x1 * cos - x2 * sin
        out[..., h : 2 * h] = x2 * cos + x1 * sin
    if x.shape[-1] > 2 * h:
        out[..., 2 * h :] = x[..., 2 * h :]
    return out


@dataclass
class Rotator:
    """Applies rotate-half RoPE by arbitrary (integer) positions with the model's frequencies."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], float32

    @classmethod
    def from_module(cls, rotary: nn.Module) -> "Rotator":
        return cls(rotary.inv_freq.detach().to(torch.float32).clone())

    @property
    def half(self) -> int:
        return int(self.inv_freq.shape[0])

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``positions`` ([B, n], any integer or float dtype) as [B, 1, n, half] float32.

        Angles are formed as ``position * inv_freq`` in float32, exactly as the model's rotary
        module forms them, so a key rotated here matches one rotated by the model.
        """
        inv = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[..., None] * inv
        return freqs.cos()[:, None], freqs.sin()[:, None]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate ``x`` ([B, H, n, D]) by the angles of ``angles()``; ``inverse`` rotates back (see ``rotate_half``)."""
        return rotate_half(x, cos, sin, inverse)
