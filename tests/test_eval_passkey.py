"""Pass-key prompts are exact; the harness scores, tabulates and draws heatmaps."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import tiny_llama
from lacache.lab.evaluation.passkey import accuracy_grid, build_passkey_prompt, plot_heatmaps, run_passkey
from lacache.lab.models import default_model_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.mark.parametrize("filler", ["grass", "essays"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_length_depth_and_single_key(tokenizer, filler, depth):
    prompt = build_passkey_prompt(tokenizer, 400, depth, filler=filler, seed=3)
    ids = prompt.input_ids[0].tolist()
    assert len(ids) == 400
    text = tokenizer.decode(ids)
    assert len(prompt.key) == 5 and text.count(prompt.key) == 2  # "The pass key is K ... K is the pass key"
    assert text.rstrip().endswith("The pass key is")
    assert prompt.key in tokenizer.decode(ids[prompt.needle_start : prompt.needle_end])
    head = len(tokenizer(
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n", add_special_tokens=False)["input_ids"])
    tail = len(tokenizer("\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"])
    room = 400 - head - (prompt.needle_end - prompt.needle_start) - tail
    assert prompt.needle_start - head == round(depth * room)  # depth placement is exact


def test_prompt_errors(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        build_passkey_prompt(tokenizer, 20, 0.5)
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(tokenizer, 200, 1.5)
    assert build_passkey_prompt(tokenizer, 200, 0.5, seed=1).key != build_passkey_prompt(tokenizer, 200, 0.5, seed=2).key


def test_harness_end_to_end_on_tiny_model(tokenizer, tmp_path):
    model = tiny_llama("sdpa", vocab_size=len(tokenizer))
    trials = run_passkey(model, tokenizer, ["full", "lacache"], [120, 160], [0.0, 1.0], [0, 1], budget=0.5,
                         method_options={"lacache": {"sinks": 2}}, new_tokens=3)
    assert len(trials) == 2 * 2 * 2 * 2
    lacache = [t for t in trials if t.method == "lacache"]
    assert {t.budget for t in lacache} == {60, 80} and all(t.budget is None for t in trials if t.method == "full")
    assert all(t.correct == (t.key in t.answer) for t in trials)
    depths, lengths, grid = accuracy_grid(trials, "full")
    assert depths == [0.0, 1.0] and lengths == [120, 160] and all(0 <= v <= 1 for row in grid for v in row)
    plot_heatmaps(trials, tmp_path / "h.png", "test")
    assert (tmp_path / "h.png").stat().st_size > 5_000
    json.dumps([t.__dict__ for t in trials])


def test_scoring_counts_a_key_anywhere_in_the_answer():
    from lacache.lab.evaluation.passkey import PasskeyTrial

    t = PasskeyTrial("x", 10, 0.5, 0, 5, "12345", " 12345. Remember", True, 0.1)
    _, _, grid = accuracy_grid([t, PasskeyTrial("x", 10, 0.5, 1, 5, "54321", " 5432", False, 0.1)], "x")
    assert grid == [[0.5]]
