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


class _Engines:
    """Stands in for ``vllm_backend.VllmAnswers``: records each engine's prompts; answers with the prompt's key
    for even-length prompts (so scoring is seen to read the answer), a wrong number otherwise."""

    def __init__(self, tokenizer, keys):
        self.tokenizer, self.keys, self.engines = tokenizer, keys, []

    def answer(self, method, slots, options, prompts, new_tokens, stop_ids):
        self.engines.append((method, slots, len(prompts), tuple(new_tokens), tuple(stop_ids)))
        return [self.tokenizer(f" {self.keys[tuple(p)] if len(p) % 2 == 0 else '00000'}.",
                               add_special_tokens=False)["input_ids"] for p in prompts]


def test_the_vllm_backend_runs_one_engine_per_method_and_budget_and_scores_as_transformers(tokenizer):
    """``--backend vllm``: the transformers run's prompts, budgets and scoring, each (method, budget in slots)
    answered by one engine with all its prompts; the rows come back in the transformers run's order, and a
    resumed run asks no engine for a finished trial."""
    lengths, depths, seeds = [300, 401], [0.0, 1.0], [0, 1]
    keys = {}
    for n in lengths:
        for d in depths:
            for s in seeds:
                p = build_passkey_prompt(tokenizer, n, d, seed=s)
                keys[tuple(p.input_ids[0].tolist())] = p.key
    engines = _Engines(tokenizer, keys)
    recorded = {}
    trials = run_passkey(None, tokenizer, ["full", "knorm"], lengths, depths, seeds, 0.5, vllm=engines,
                         on_trial=recorded.__setitem__)
    assert [(t.length, t.depth, t.seed, t.method) for t in trials] == [
        (n, d, s, m) for n in lengths for d in depths for s in seeds for m in ["full", "knorm"]]
    assert engines.engines == [("full", None, 8, (8,) * 8, (None,) * 8), ("knorm", 150, 4, (8,) * 4, (None,) * 4),
                               ("knorm", 200, 4, (8,) * 4, (None,) * 4)]
    assert all(t.correct == (t.length % 2 == 0) for t in trials) and {t.budget for t in trials} == {None, 150, 200}
    assert len(recorded) == 16
    engines.engines.clear()
    again = run_passkey(None, tokenizer, ["full", "knorm"], lengths, depths, seeds, 0.5, vllm=engines,
                        finished={k: v for k, v in recorded.items() if k[3] == "full" or k[0] == 300})
    assert engines.engines == [("knorm", 200, 4, (8,) * 4, (None,) * 4)] and again == trials


@pytest.mark.parametrize("argv, match", [
    (["--backend", "vllm"], "pass --prefill chunked"),
    (["--backend", "vllm", "--prefill", "chunked", "--methods", "tova"], "tova is not served in vLLM"),
])
def test_the_vllm_backend_refuses_what_it_cannot_run_in_one_line(argv, match, tmp_path, capsys):
    from lacache.cli.main import main

    assert main(["eval", "passkey", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") <= 2, err
