"""How bounded caches are attached to the model that runs them: one set of hooks per model, shared.

A ``Cache.update`` sees keys and values only. Three things need more of the forward pass:

* left-padded batches need the decoder's 2D ``attention_mask`` (``cache.padded``);
* refusing misuse needs to know that a forward comes from a model like the one the cache was built
  for (layer count, head shape, RoPE frequencies) and that it continues the cache's stream;
* attention-score policies (TOVA, H2O) need each attention layer's input, to recompute the query
  (``lacache.cache.observe``).

Forward pre-hooks provide them (and a decoder post-hook lets a static cache move its slots into its
fixed buffers after a pass of several tokens, ``cache.static``). They are installed once per model,
not once per cache, and each one acts on the cache found in the forward's *own* keyword arguments (``cache=`` or
``past_key_values=``). A hook owned by a cache would act on every forward of the model, whichever
cache that forward used: two threads sharing a model would read each other's queries, and N live
caches would cost N hooks per layer on every forward, also of plain ``generate()`` calls. Here a
forward without a bounded cache costs one dictionary lookup per hook. The hooks are counted by the
caches attached to the model and removed when the last of them is garbage-collected (attention
hooks when the last cache that reads attention is).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from torch import nn

from ..rope import Rotator
from .bounded import BoundedCache
from .observe import attention_modules

__all__ = ["ModelSignature", "ModelHooks", "attach_cache", "model_signature", "hooks_for"]


@dataclass(frozen=True)
class ModelSignature:
    """What a bounded cache's contents depend on: a cache is only valid with models that share it."""

    num_layers: int
    kv_heads: int
    head_dim: int
    #: per layer, the RoPE frequencies (``inv_freq``) its keys were rotated with
    rope: tuple[tuple[float, ...], ...]

    def differences(self, other: ModelSignature) -> list[str]:
        """Human-readable differences from ``other`` (the model a forward is running)."""
        found = []
        for name, label in (("num_layers", "layers"), ("kv_heads", "key/value heads"), ("head_dim", "head dim")):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                found.append(f"{label}: built for {mine}, this model has {theirs}")
        if not found and self.rope != other.rope:
            found.append("RoPE frequencies (rope_theta / rope scaling) differ")
        return found


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_signature(model: nn.Module, rotators: list[Rotator]) -> ModelSignature:
    """The signature of ``model``, whose per-layer rotators are ``rotators``."""
    config = _text_config(model)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or (int(config.hidden_size) // heads if heads else 0)
    rope = tuple(tuple(float(f) for f in rotator.inv_freq.tolist()) for rotator in rotators)
    return ModelSignature(int(config.num_hidden_layers), kv_heads, int(head_dim), rope)


def _forward_cache(kwargs: dict):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


class ModelHooks:
    """The hooks of one model: a decoder pre-hook, and attention pre-hooks while a cache needs them."""

    def __init__(self, model: nn.Module, signature: ModelSignature):
        self.signature = signature
        self._model = weakref.ref(model)
        self._caches = 0
        self._attention_caches = 0
        decoder = getattr(model, "base_model", model)
        self._decoder_handle = decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True)
        self._after_handle = decoder.register_forward_hook(self._after_decoder, with_kwargs=True)
        self._attention_handles: list = []
        self._holds: dict[int, weakref.finalize] = {}  # id(cache) -> its finalizer

    @property
    def attached(self) -> int:
        """Live caches attached to the model."""
        return self._caches

    def acquire(self, cache: BoundedCache) -> None:
        """Count ``cache`` as attached until it is garbage-collected or released."""
        reads_attention = cache.observer is not None
        with _LOCK:
            self._caches += 1
            if reads_attention:
                self._attention_caches += 1
                if not self._attention_handles:
                    self._install_attention_hooks()
            key = id(cache)
            self._holds[key] = weakref.finalize(cache, self._release, key, reads_attention)

    def release(self, cache: BoundedCache) -> None:
        """Stop counting ``cache`` now (``cache.detach()``)."""
        with _LOCK:
            hold = self._holds.get(id(cache))
        if hold is not None:
            hold()  # runs _release once; the finalizer is then dead

    def _install_attention_hooks(self) -> None:
        model = self._model()
        modules = attention_modules(model) if model is not None else []
        self._attention_handles = [m.register_forward_pre_hook(_before_attention, with_kwargs=True) for m in modules]

    def _release(self, key: int, reads_attention: bool) -> None:
        with _LOCK:
            self._holds.pop(key, None)
            self._caches -= 1
            if reads_attention:
                self._attention_caches -= 1
                if self._attention_caches == 0:
                    for handle in self._attention_handles:
                        handle.remove()
                    self._attention_handles = []
            if self._caches == 0:
                self._decoder_handle.remove()
                self._after_handle.remove()
                model = self._model()
                if model is not None and _REGISTRY.get(model) is self:
                    del _REGISTRY[model]

    def _before_decoder(self, module, args, kwargs):
        cache = _forward_cache(kwargs)
        if not isinstance(cache, BoundedCache):
            return None
        if cache._hooks is None and cache.signature == self.signature:
            # a cache of this model's shape that lost its hooks (a pickle): adopt it for its lifetime
            with _LOCK:
                if cache._hooks is None:
                    self.acquire(cache)
                    cache._hooks, cache.signature = self, self.signature
        return cache._enter_forward(self.signature, args, kwargs)

    def _after_decoder(self, module, args, kwargs, output):
        cache = _forward_cache(kwargs)
        if isinstance(cache, BoundedCache):
            cache._leave_forward()
        return None


def _before_attention(module, args, kwargs):
    cache = _forward_cache(kwargs)
    if isinstance(cache, BoundedCache) and cache.observer is not None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache.observer.stash(module, hidden, kwargs.get("position_embeddings"))
    return None


_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, ModelHooks]" = weakref.WeakKeyDictionary()
#: one lock for the registry and every model's counts: a cache's finalizer may run in any thread
_LOCK = threading.RLock()


def hooks_for(model: nn.Module) -> ModelHooks | None:
    """The hooks lacache holds on ``model`` (None while no cache is attached to it)."""
    with _LOCK:
        return _REGISTRY.get(model)


def attach_cache(model: nn.Module, cache: BoundedCache, signature: ModelSignature) -> None:
    """Attach ``cache`` to ``model`` (whose signature is ``signature``), installing the model's hooks if needed.

    Refuses a cache built for a model with another signature.
    """
    if cache.signature is not None and cache.signature != signature:
        raise ValueError(
            f"this {type(cache).__name__} was built for another model ({'; '.join(cache.signature.differences(signature))}): "
            f"build a new cache for this model with {type(cache).__name__}.from_model(model, ...)"
        )
    with _LOCK:
        hooks = _REGISTRY.get(model)
        if hooks is None:
            hooks = _REGISTRY[model] = ModelHooks(model, signature)
        hooks.acquire(cache)
    cache._hooks = hooks
    # the hooks' own (equal) object: the check before every forward is then an identity test
    cache.signature = hooks.signature if hooks.signature == signature else signature
