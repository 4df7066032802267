"""The ``lacache`` key of vLLM's ``additional_config``: parsed and checked once, at engine start.

``vllm.LLM(..., additional_config={"lacache": {"method": "lacache", "budget": 256, ...}})`` or
``vllm serve MODEL --additional-config '{"lacache": {...}}'``. The option names and defaults are
those of ``LaCache.from_model`` / ``StreamingLLMCache.from_model``; the retention rule is built by
the same functions the transformers cache uses, so both backends keep the same tokens. This
module imports no vLLM: it is tested without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from ..policies.base import RetentionPolicy, resolve_chunk
from ..policies.points import CompactionPoints, points_for
from ..registry import BACKEND_OPTIONS, method_spec, served_default_method, served_methods
from ..registry import is_half_precision as _half_precision_dtype

__all__ = ["KEY", "ServingConfig", "parse_config", "serving_config", "served_methods"]

#: the key of ``additional_config`` that switches the plugin on
KEY = "lacache"

# What a rule reads decides whether a paged engine can run it: index-only rules need nothing but
# slot counts, and key-reading rules need counts on the scheduler and a key statistic on the workers, which
# read them from the paged keys. vLLM's fused attention kernels never materialise the queries'
# attention, so rules that read it are refused.
_WHY_NOT = {
    "attention": "it needs attention scores, which vLLM's fused attention does not expose",
}


def __getattr__(name):
    if name == "SERVED_METHODS":  # read live: methods can be registered after import
        return served_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ServingConfig:
    """What the scheduler and the workers need to keep every request inside its budget."""

    method: str
    budget: int
    chunk: int
    options: Mapping[str, object]
    num_layers: int
    _policy: RetentionPolicy
    #: keep a finished request's compacted cache for a request that continues its token stream
    reuse: bool = True

    @property
    def reads_keys(self) -> bool:
        """The rule chooses survivors by a key statistic (the workers read it from the paged keys)."""
        from ..policies.base import IndexPolicy

        return not isinstance(self._policy, IndexPolicy)

    @property
    def capacity(self) -> int:
        """The most slots a request holds between passes: the budget, or a little more for the authors'
        schedule (``floor(R/2)``; none with one-slot rungs)."""
        return self._policy.most_slots(self.budget)

    @property
    def target(self) -> int:
        """Slots a compaction leaves: ``budget - chunk``."""
        return self.budget - self.chunk

    @cached_property
    def points(self) -> CompactionPoints:
        """Where every request compacts (``policies.points``): the scheduler clips each pass at them."""
        return points_for(self._policy, self.budget, self.chunk)

    def new_slots(self, track_tokens: bool = False):
        """A fresh replay of one request's slots (``slots.RequestSlots``), as the scheduler and workers keep."""
        from .slots import RequestSlots

        return RequestSlots(self.new_policy(), self.budget, self.points, self.num_layers, track_tokens=track_tokens)

    def new_policy(self) -> RetentionPolicy:
        """A fresh rule for one request; index-only rules share their memoised plans."""
        policy = self._policy.fork()
        policy.reset()
        return policy

    @property
    def decode_slots(self) -> int:
        """Slots a decoding request holds at its peak: ``capacity`` and the token being computed. The
        scheduler reserves this row at admission and both sides keep it (``slots.kept_blocks``)."""
        return self.capacity + 1

    def peak_slots(self, step: int) -> int:
        """The most slots one request's pass attends over when a prefill chunk is ``step`` tokens: the decode row
        for a rule with compaction points (the scheduler stops every pass at them, ``policies.points``), the
        held slots plus a whole chunk for a rule that sets its own points (the authors' schedule)."""
        return max(self.decode_slots, self.points.peak(self.capacity, int(step)))

    def decode_row(self, block_size: int) -> tuple[int, int]:
        """(slots, blocks) of ``decode_slots`` in whole blocks of ``block_size``."""
        slots = self.decode_slots
        return slots, -(-slots // block_size)

    def _slots_at(self, budget: int) -> int:
        """Most slots held at another budget (a budget the rule refuses counts as never fitting)."""
        try:
            return self._policy.most_slots(budget)
        except ValueError:
            return 1 << 62

    def row_note(self, block_size: int) -> str:
        """One sentence on what a request's row costs in blocks, and the budget that fills its blocks
        exactly when this one spills one or two slots into a block of its own."""
        slots, blocks = self.decode_row(block_size)
        note = f"each decoding request holds {slots} slots = {blocks} block(s) of {block_size}"
        last = slots - (blocks - 1) * block_size  # slots in the row's last block
        if blocks > 1 and last <= block_size // 2:
            fits = (blocks - 1) * block_size
            smaller = next((b for b in range(self.budget - 1, 0, -1) if self._slots_at(b) + 1 <= fits), None)
            if smaller is not None:
                note += f"; its last block holds only {last} of them: budget {smaller} would need {blocks - 1}"
        elif last < block_size:
            larger = max(b for b in range(self.budget, self.budget + block_size)
                         if self._slots_at(b) + 1 <= blocks * block_size)
            if larger > self.budget:
                note += f" (budget {larger} would cost the same blocks)"
        return note

    def describe(self) -> dict:
        return {"method": self.method, "budget": self.budget, "chunk": self.chunk, "period": self.points.period,
                "reuse": self.reuse, **self._policy.describe()}


def parse_config(raw: object, num_layers: int, half_precision: bool = False) -> ServingConfig:
    """Check ``additional_config["lacache"]`` for a model of ``num_layers`` layers; one ``ValueError``
    that names the key and a value that works otherwise. ``half_precision`` (the engine runs in bfloat16 or
    float16) picks the half-precision serving default when no method is named (``served_default_method``)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f'additional_config["{KEY}"] must be a JSON object, e.g. {{"method": "lacache", "budget": 256}}')
    settings = dict(raw)
    name = settings.pop("method", None)
    reuse = settings.pop("reuse", True)
    if not isinstance(reuse, bool):
        raise ValueError(f'{KEY}.reuse={reuse!r} must be true or false (keep finished requests\' caches for the '
                         'requests that continue them), e.g. "reuse": true')
    try:
        spec = method_spec(name) if name is not None else method_spec(served_default_method(half_precision))
    except ValueError:
        raise ValueError(f"{KEY}.method={name!r} is not served in vLLM; use one of {served_methods()}, "
                         f'e.g. "method": "{served_default_method()}"') from None
    method = spec.name
    if not spec.served:
        why = _WHY_NOT.get(spec.sees, "it keeps every token (run vLLM without the plugin)") if spec.bounded else \
            "it keeps every token (run vLLM without the plugin)"
        raise ValueError(f"{KEY}.method={method!r} is not served in vLLM ({why}); use one of {served_methods()}, "
                         f'e.g. "method": "{served_default_method()}"')
    if "budget" not in settings:
        raise ValueError(f'{KEY}.budget is required: slots per layer per request, e.g. "budget": 256')
    budget = settings.pop("budget")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f'{KEY}.budget={budget!r} must be a positive integer (slots per layer), e.g. "budget": 256')
    accepted = spec.options()
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"{KEY}: unknown option(s) {unknown} for method {method!r}; accepted: {sorted(accepted)}")
    positions = settings.pop("positions", BACKEND_OPTIONS["positions"])
    if settings.pop("static", False) is not False:
        raise ValueError(f"{KEY}.static: vLLM's own CUDA graphs run its decode steps already; leave static out")
    if positions != "shift":
        raise ValueError(f'{KEY}.positions={positions!r}: vLLM serving re-positions keys by slot only; use "shift"')
    fixed = sorted(set(settings) & set(spec.defaults))
    if fixed:
        raise ValueError(f'{KEY}.{fixed[0]}: method "{method}" fixes {fixed[0]}={spec.defaults[fixed[0]]!r}; leave it '
                         f"out (or serve method {spec.family!r} with it)")
    sinks = settings.get("sinks", accepted.get("sinks", 0))
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f'{KEY}.sinks={sinks!r} must be a non-negative integer, e.g. "sinks": 4')
    try:
        policy = spec.make_policy(num_layers, budget, **settings)
        if policy.needs_attention or type(policy).count_after is RetentionPolicy.count_after:
            raise ValueError(f"method {method!r} makes a {type(policy).__name__}, which cannot say how many slots "
                             "survive a compaction without reading attention (the scheduler never sees it); "
                             f'use one of {served_methods()}, e.g. "method": "{served_default_method()}"')
        # every served rule amortises its compactions (chunk None: budget // 16; key-norm too): an engine cannot
        # afford a compaction per token per request
        chunk = resolve_chunk(settings.get("chunk"), budget, policy.min_target()) if policy.amortises else 0
    except (TypeError, ValueError) as err:  # the shared builders name the parameter; say where it came from
        raise ValueError(f"{KEY}: {err}") from None
    return ServingConfig(method, budget, chunk, dict(raw), num_layers, policy, reuse)


def is_half_precision(vllm_config) -> bool:
    """The engine's model runs in a dtype other than float32 (bfloat16 or float16)."""
    return _half_precision_dtype(getattr(getattr(vllm_config, "model_config", None), "dtype", None))


def serving_config(vllm_config) -> ServingConfig | None:
    """The parsed ``lacache`` settings of an engine, or None when the plugin is off for it."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if KEY not in extra:
        return None
    cached = getattr(vllm_config, "_lacache_parsed", None)
    if cached is not None:
        return cached
    text = vllm_config.model_config.hf_text_config
    parsed = parse_config(extra[KEY], int(text.num_hidden_layers), is_half_precision(vllm_config))
    try:
        object.__setattr__(vllm_config, "_lacache_parsed", parsed)
    except Exception:  # a frozen or slotted config: parse again next time (cheap)
        pass
    return parsed
