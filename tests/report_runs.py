"""Small run folders for the report's tests, written by the real commands (tiny models, seconds).

``make_runs(root)`` fills ``root`` with what ``lacache eval ppl|passkey|ruler`` and ``lacache bench
decode|cache`` write, an inspector folder with the files ``lacache inspect`` leaves (``inspect.json``
with its documented keys, ``inspect.png``, ``inspect.svg``), and ``old/``: results as an older
lacache left them (no kind, no run record, no figure, layouts this version does not write, a
damaged file) plus files that are no lacache result at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lacache.cli import main as cli_main

OLD_PROBLEMS = ("passkey.json", "decode.json", "ruler.json")  # the old files the report cannot read


def tiny_model_dir(path: Path) -> Path:
    """A tiny random Llama saved with the bundled tokenizer, so the commands run end to end in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lacache.lab.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(argv: list[str]) -> None:
    assert cli_main(argv) == 0, argv


def _inspect(folder: Path) -> None:
    """The files ``lacache inspect`` writes (its JSON keys as documented; the figures drawn here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.imshow([[0, 1, 2], [2, 1, 0]])
    for name in ("inspect.png", "inspect.svg"):
        fig.savefig(folder / name)
    plt.close(fig)
    payload = {"kind": "inspect", "command": ["lacache", "inspect", "--budget", "64"],
               "environment": {"torch": torch.__version__, "dtype": "float32", "device": "cpu"},
               "model": "random tiny Llama", "budget": 64, "prompt_tokens": 300, "methods": ["lacache", "streaming"],
               "steps": [0, 100], "figures": ["inspect.png", "inspect.svg"], "maps": []}
    (folder / "inspect.json").write_text(json.dumps(payload))


def _older(folder: Path, ppl_json: Path) -> None:
    """Results as an older lacache left them, and files that are no lacache result."""
    folder.mkdir(parents=True)
    old = json.loads(ppl_json.read_text())
    del old["run"], old["kind"], old["schema"]  # written before results said what they are; no ppl.png beside it
    (folder / "ppl.json").write_text(json.dumps(old))
    (folder / "passkey.json").write_text(json.dumps({"budget": 0.5, "trials": [{"method": "full", "correct": True}]}))
    (folder / "decode.json").write_text(json.dumps({"benchmark": "decode", "results": {"full": 12.5}}))
    (folder / "ruler.json").write_text('{"budget": 0.5, "trials": [')  # cut off mid-write
    (folder / "notes.json").write_text(json.dumps({"note": "not a result"}))
    (folder / "README.txt").write_text("hand-written notes")


def make_runs(root: Path, model_dir: Path) -> Path:
    """Every kind of run folder the report reads, under ``root``; returns ``root``."""
    text = root / "text.txt"
    root.mkdir(parents=True, exist_ok=True)
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    model = ["--model", str(model_dir), "--quiet"]
    _run(["eval", "ppl", *model, "--text-file", str(text), "--tokens", "100", "--budgets", "32,48",
          "--methods", "full,streaming,lacache", "--window", "50", "--out", str(root / "ppl")])
    _run(["eval", "passkey", *model, "--lengths", "120,160", "--depths", "0,1", "--seeds", "1",
          "--methods", "full,lacache", "--option", "lacache.sinks=2", "--out", str(root / "passkey")])
    _run(["eval", "ruler", *model, "--lengths", "320", "--seeds", "1", "--tasks", "niah_multikey,variable_tracking",
          "--methods", "full,streaming", "--out", str(root / "ruler")])
    _run(["bench", "decode", "--tiny", "--quiet", "--tokens", "20", "--budget", "24", "--window", "10",
          "--methods", "full,lacache", "--out", str(root / "bench")])
    _run(["bench", "cache", "--budgets", "48", "--layers", "4", "--kv-heads", "2", "--head-dim", "16", "--steps", "20",
          "--ref-steps", "5", "--warmup", "2", "--quiet", "--out", str(root / "bench")])
    _inspect(root / "inspect")
    _older(root / "old", root / "ppl" / "ppl.json")
    return root
