"""split_glyphs: the 100 rendered Greek / Cyrillic / digit classes, their rendering, cache
and class-incremental split, and one end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clbench.scenarios.glyphs import (
    GLYPHS,
    LATIN_LOOKALIKES,
    SAME_IMAGE,
    SplitGlyphsConfig,
    cache_path,
    class_order,
    glyph_name,
    load_glyphs,
    render_glyphs,
    split_glyphs,
)

from clbench.errors import ConfigError
from clbench.pretrain.glyphs import CHARACTERS, CharacterSetSource, fonts_with_glyph
from helpers import FAST, only_run_dir, results_of, run_cli


def test_the_100_classes_are_distinct_and_disjoint_from_the_pretraining_glyphs() -> None:
    assert len(GLYPHS) == 100 and len(set(GLYPHS)) == 100
    assert not set(GLYPHS) & set(CHARACTERS)  # Latin letters and symbols of pretraining
    lookalikes = "".join(LATIN_LOOKALIKES.values())
    assert set(LATIN_LOOKALIKES) <= set(CHARACTERS)  # keyed by the glyph they look like
    assert len(set(lookalikes)) == len(lookalikes)
    assert not set(GLYPHS) & set(lookalikes)
    assert not set(GLYPHS) & set(SAME_IMAGE)
    assert not set(lookalikes) & set(SAME_IMAGE)
    assert set(SAME_IMAGE.values()) <= set(GLYPHS)  # each left out for a class that is kept
    # the Greek and Cyrillic twins of Latin letters are among the left-out look-alikes
    for twin in "ΑΒΕΗΙΚΜΝΟΡΤΧΥΖοАВЕКМНОРСТУХаеорсух01":
        assert twin in lookalikes, glyph_name(twin)
    names = [glyph_name(c) for c in GLYPHS]
    assert all(n.startswith(("GREEK", "CYRILLIC", "DIGIT")) for n in names)


def test_every_class_is_rendered_only_with_fonts_that_have_its_glyph() -> None:
    for char in GLYPHS:
        assert len(fonts_with_glyph(char)) >= 4, glyph_name(char)
    assert fonts_with_glyph("\u4e2d") == ()  # a CJK ideograph: no matplotlib text font
    with pytest.raises(ValueError, match="no font"):
        CharacterSetSource("Ж\u4e2d")  # would be a missing-glyph box
    with pytest.raises(ValueError, match="repeated"):
        CharacterSetSource("ЖЖ")
    with pytest.raises(TypeError, match="unknown warp"):
        CharacterSetSource("Ж", rotation=3.0)


def _confusion(chars: str, train_per_class: int = 100, test_per_class: int = 40) -> torch.Tensor:
    """Confusion (rows: true class, summing to 1) of a small MLP trained on fresh 8x8
    renderings of ``chars``, tested on others (seeded)."""
    source = CharacterSetSource(chars)
    n = len(chars)

    def draw(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.arange(n).repeat_interleave(per_class)
        x, y = source.sample_counts(len(classes), torch.Generator().manual_seed(seed), classes)
        return x.flatten(1) / 16, y

    (x, y), (x_test, y_test) = draw(train_per_class, 0), draw(test_per_class, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, n),
        )  # fmt: skip
        opt = torch.optim.Adam(mlp.parameters(), lr=2e-3)
        for _ in range(25):
            for batch in torch.randperm(len(x)).split(128):
                loss = torch.nn.functional.cross_entropy(mlp(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            predicted = mlp(x_test).argmax(1)
    confusion = torch.zeros(n, n)
    confusion.index_put_((y_test, predicted), torch.ones(len(y_test)), accumulate=True)
    return confusion / test_per_class


def test_no_two_classes_make_the_same_images() -> None:
    """A classifier of the warped 8x8 renderings tells every pair of classes apart, where it
    mixes up the two cases of one Cyrillic letter (what the box fitting makes the same)."""
    confusion = _confusion(GLYPHS)
    pairs = confusion + confusion.T  # how often i is taken for j or j for i
    pairs.fill_diagonal_(0)
    i, j = divmod(int(pairs.argmax()), 100)
    assert float(pairs.max()) < 1 / 3, (GLYPHS[i], GLYPHS[j], float(pairs.max()))
    assert float(confusion.diag().min()) > 0.5 and float(confusion.diag().mean()) > 0.85
    twins = _confusion("ЛлШшЯя")  # left out: one letter in two cases
    assert all(float(twins[k, k + 1] + twins[k + 1, k]) > 1 / 3 for k in (0, 2, 4))


def test_rendering_is_deterministic_from_the_seed_and_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CLBENCH_CACHE_DIR", str(tmp_path))
    first = render_glyphs(3, 2, 1)
    again = render_glyphs(3, 2, 1)
    other = render_glyphs(4, 2, 1)
    assert first.keys() == {"train_counts", "train_labels", "test_counts", "test_labels"}
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["train_counts"], other["train_counts"])
    one = render_glyphs(3, 1, 1)
    assert not torch.equal(one["train_counts"], one["test_counts"])  # test: its own seed
    assert first["train_counts"].shape == (200, 8, 8) and first["train_counts"].max() <= 16
    assert torch.equal(first["train_labels"], torch.arange(100).repeat_interleave(2))
    path = cache_path(3, 2, 1)
    assert not path.exists()
    loaded = load_glyphs(3, 2, 1)
    assert path.is_file() and all(torch.equal(loaded[k], first[k]) for k in first)
    stamp = path.stat().st_mtime_ns
    assert all(torch.equal(v, load_glyphs(3, 2, 1)[k]) for k, v in first.items())
    assert path.stat().st_mtime_ns == stamp  # read, not rendered again
    path.write_bytes(b"not a safetensors file")
    assert all(torch.equal(v, load_glyphs(3, 2, 1)[k]) for k, v in first.items())
    assert cache_path(3, 2, 1) != cache_path(3, 2, 2) != cache_path(4, 2, 1)


def test_split_follows_pilot_order_and_uneven_splits(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CLBENCH_CACHE_DIR", str(tmp_path))
    np.random.seed(1993)
    assert class_order(1993) == np.random.permutation(100).tolist()  # PILOT's shuffle
    scenario = split_glyphs(SplitGlyphsConfig(train_per_class=2, test_per_class=1))
    assert scenario.num_experiences == 10 and scenario.in_memory
    assert scenario.classes_per_experience == [list(range(10 * t, 10 * t + 10)) for t in range(10)]
    assert scenario.input_shape == (1, 16, 16)
    assert scenario.class_names == [GLYPHS[c] for c in class_order(1993)]
    x, _y, *_ = scenario.train_stream[0].dataset[0]
    assert x.shape == (1, 16, 16) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert [len(e.dataset) for e in scenario.test_stream] == [10] * 10
    uneven = split_glyphs(
        SplitGlyphsConfig(
            n_experiences=0, init_cls=50, increment=10, train_per_class=2, test_per_class=1
        )
    )
    assert [len(c) for c in uneven.classes_per_experience] == [50, 10, 10, 10, 10, 10]
    with pytest.raises(ConfigError, match="n_experiences"):
        SplitGlyphsConfig(n_experiences=7)
    with pytest.raises(ConfigError, match="train_per_class"):
        SplitGlyphsConfig(train_per_class=0)


def test_clbench_run_split_glyphs(tmp_path) -> None:
    code = run_cli(
        [
            "run",
            "scenario=split_glyphs",
            *FAST,
            "scenario.train_per_class=3",
            "scenario.test_per_class=2",
            f"runs_dir={tmp_path}",
        ]
    )
    assert code == 0
    results = results_of(only_run_dir(tmp_path))
    assert results["scenario"] == "split_glyphs" and len(results["class_names"]) == 100
    assert [len(c) for c in results["classes_per_experience"]] == [50, 50]
    assert results["test_sizes"] == [100, 100]
    assert len(results["accuracy_matrix"]) == 2
