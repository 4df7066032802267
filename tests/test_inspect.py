"""The retention inspector: maps read from live caches, and ``lacache inspect``."""

import json

import numpy as np
import pytest
import torch

from conftest import bundled_tokenizer_and_tiny_model, tiny_llama
from lacache import make_cache
from lacache.lab.inspect import ROLES, RetentionMap, draw, retention, watch

CODE = {role: code for code, role in enumerate(ROLES)}


def _ids(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _fed(model, method: str, budget: int, length: int, **options):
    cache = make_cache(method, model, budget=budget, **options)
    with torch.no_grad():
        model(_ids(1, length), cache=cache)
    return cache


@pytest.mark.parametrize("method", ["lacache", "lacache-capped", "streaming", "knorm", "tova", "lacache-salient"])
def test_the_map_holds_exactly_each_layers_tokens(method):
    model = tiny_llama(layers=8)
    cache = _fed(model, method, 48, 150)
    found = retention(cache, method=method)
    assert found.codes.shape == (8, 150)
    for layer in range(8):
        held = np.flatnonzero(found.codes[layer])
        assert held.tolist() == cache.token_positions(layer).tolist()
    assert found.slots() == [cache.layers[i].num_slots for i in range(8)]


def test_ladder_roles_sinks_window_and_a_staggered_middle():
    model = tiny_llama(layers=8)
    cache = _fed(model, "lacache-capped", 48, 150, sinks=3)
    found = retention(cache)
    window = cache.policy.window
    assert (found.codes[:, :3] == CODE["sink"]).all()
    assert (found.codes[:, -window:] == CODE["window"]).all()
    middle = found.codes[:, 3:-window]
    assert set(np.unique(middle)) <= {CODE["evicted"], CODE["kept"]}
    assert len({tuple(row) for row in middle.tolist()}) > 1, "layers keep different old tokens"
    assert found.coverage() > found.layer_coverage(), "together the layers cover more than any one"


def test_streaming_is_sinks_and_one_recent_band_in_every_layer():
    cache = _fed(tiny_llama(), "streaming", 40, 100, sinks=4)
    found = retention(cache)
    expected = np.zeros(100, dtype=np.int8)
    expected[:4] = CODE["sink"]
    expected[-(cache.num_slots - 4):] = CODE["window"]  # the rest of the held slots, 36 less the chunk
    assert (found.codes == expected).all()


def test_salient_pool_members_are_marked():
    model = tiny_llama(layers=8)
    cache = _fed(model, "lacache-salient", 64, 200)
    found = retention(cache)
    pooled = (found.codes == CODE["salient"]).sum(axis=1)
    assert pooled.tolist() == cache.policy._pooled and pooled.max() > 0


def test_full_cache_holds_everything():
    from transformers import DynamicCache

    model = tiny_llama()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_ids(2, 30), cache=cache)
    found = retention(cache, method="full")
    assert found.codes.shape == (4, 30) and (found.codes == CODE["kept"]).all() and found.coverage() == 1.0


def test_a_padded_row_maps_like_the_sequence_alone():
    model = tiny_llama()
    ids = _ids(3, 70, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    cache = make_cache("lacache", model, budget=32)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=1, do_sample=False)
    alone = _fed_ids(model, ids[1:, 20:])
    assert (retention(cache, batch_index=1).codes == retention(alone).codes).all()


def _fed_ids(model, ids):
    cache = make_cache("lacache", model, budget=32)
    with torch.no_grad():
        model.generate(ids, cache=cache, max_new_tokens=1, do_sample=False)
    return cache


@pytest.mark.parametrize("method", ["tova", "h2o", "lacache"])
def test_watch_takes_maps_at_decode_steps(method):
    """Attention-score methods work too: the prompt's forward is observed like any other."""
    model = tiny_llama()
    maps = watch(model, _ids(4, 60), method, 24, [0, 5, 30])
    assert [m.step for m in maps] == [0, 5, 30]
    assert [m.seen for m in maps] == [60, 65, 90]
    assert all(max(m.slots()) <= 24 for m in maps)


def test_watch_refuses_bad_steps_and_prompts():
    model = tiny_llama()
    with pytest.raises(ValueError, match="steps"):
        watch(model, _ids(5, 10), "lacache", 24, [-1])
    with pytest.raises(ValueError, match="one prompt"):
        watch(model, _ids(5, 10, batch=2), "lacache", 24, [0])


def test_draw_writes_png_and_svg(tmp_path):
    maps = [RetentionMap("a", 0, np.array([[2, 1, 0, 3], [2, 0, 1, 3]], dtype=np.int8)),
            RetentionMap("b", 0, np.array([[2, 0, 0, 3], [2, 0, 0, 3]], dtype=np.int8))]
    draw(maps, [tmp_path / "m.png", tmp_path / "m.svg"], title="t")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "m.svg").read_text()


@pytest.fixture
def tiny_pair(monkeypatch):
    import lacache.lab.models

    tokenizer, model = bundled_tokenizer_and_tiny_model(layers=6)
    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: (model, tokenizer))
    return model, tokenizer


def test_cli_draws_methods_side_by_side(tiny_pair, tmp_path, capsys):
    from lacache.cli.main import main

    out = tmp_path / "insp"
    code = main(["inspect", "--compare", "lacache,streaming,h2o,full", "--budget", "32", "--tokens", "80",
                 "--at", "0,10", "--out", str(out), "--quiet"])
    assert code == 0
    payload = json.loads((out / "inspect.json").read_text())
    assert payload["kind"] == "inspect" and payload["schema"] == 1 and payload["figures"] == ["inspect.png", "inspect.svg"]
    assert payload["run"]["command"][:2] == ["lacache", "inspect"]  # the run record the report shows
    assert [(m["method"], m["step"]) for m in payload["maps"]] == [
        (name, step) for name in ("lacache", "streaming", "h2o", "full") for step in (0, 10)]
    assert all(len(m["codes"]) == 6 and len(m["codes"][0]) == m["seen"] for m in payload["maps"])
    assert (out / "inspect.png").stat().st_size > 1000 and (out / "inspect.svg").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--at", "0,-5"], "--at"),
    (["--at", "x"], "--at"),
    (["--compare", "lacache,bogus"], "bogus"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--option", "streaming.sinks=2"], "not being run"),
])
def test_cli_bad_values_are_one_line(tiny_pair, tmp_path, capsys, argv, message):
    from lacache.cli.main import main

    assert main(["inspect", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lacache: error:") and message in err[0]


def test_the_figure_zooms_on_the_ladder_and_lists_only_the_roles_it_shows(tmp_path):
    """A ladder's stagger gets a zoomed panel (one square per layer and token); StreamingLLM, the same in
    every layer, gets none; the legend lists the roles present and nothing else."""
    from lacache.lab.inspect import ZOOM_TOKENS, draw, watch, zoom_window

    model = tiny_llama(layers=6)
    ids = torch.randint(3, 90, (1, 300), generator=torch.Generator().manual_seed(0))
    (ladder,) = watch(model, ids, "lacache", 64, [0])
    (stream,) = watch(model, ids, "streaming", 64, [0])
    window = zoom_window(ladder.codes)
    assert window is not None and window[1] - window[0] == ZOOM_TOKENS
    held = ladder.codes[:, window[0]:window[1]] != 0
    assert (held.any(axis=0) & ~held.all(axis=0)).sum() > ZOOM_TOKENS // 2  # layers differ across the window
    assert zoom_window(stream.codes) is None
    roles = draw([ladder, stream], [tmp_path / "m.png"])
    assert roles == ["evicted", "kept", "sink", "window"]  # no "salient": no pool here
    assert draw([stream], [tmp_path / "s.png"]) == ["evicted", "sink", "window"]
