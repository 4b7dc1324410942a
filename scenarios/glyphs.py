"""split_glyphs: 100 classes of Greek and Cyrillic letters and digits, 10 x 10 (offline).

The samples are font renderings, not handwriting: each class is one character drawn with
the TrueType fonts matplotlib ships (only the fonts whose character map has a glyph for
it), randomly warped and thresholded to a 32x32 bitmap, then counted in 4x4 blocks like
scikit-learn's digits (:class:`clbench.pretrain.glyphs.CharacterSetSource`: the micro
ViT's pretraining sampler with another character set and other seeds). The characters
are disjoint from the pretraining set (Latin letters and ``#$%&?@``): every Greek or
Cyrillic letter that looks like a Latin letter of it is removed, and of two characters
that the box fitting makes the same image (upper/lower case forms of one Cyrillic
letter, Greek and Cyrillic twins) only one is kept. Renderings are deterministic from
``render_seed`` and cached in the clbench cache directory.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import PIL
import torch
from clbench.scenarios.base import Scenario, class_incremental_from_tensors, class_split
from PIL import features
from safetensors import SafetensorError
from safetensors.torch import load_file

from clbench.checks import check_positive, check_seed
from clbench.lowres import CHANNELS, INPUT_SIZE, to_model_input

#: The 100 classes in label order (a class's label is its position): font renderings of
#: these characters, grouped by script and Unicode block.
GLYPHS: str = (
    "23456789"  # digits (0 and 1 look like O and l: left out)
    "ΔΘΛΞΣΦΨΩ"  # Greek capitals without a Latin twin
    "αβγδεζηλμξπςσφω"  # Greek small letters without a Latin twin
    "άέήώ"  # Greek small letters with tonos
    "ͰͻͽϐϑϖϘϞϟϠϡϷ"  # Greek letter variants, archaic letters and numerals
    "БДЖИЙЛЦЧШЩЪЫЭЮЯ"  # Russian letters (one case: the other fits to the same image)
    "ЂЄЉЊЋђ"  # Serbian and Ukrainian letters
    "ѢѣѤѨѪѬѮѼ"  # early Cyrillic letters
    "ҊҘҤҦҴҶӘӚӜӞӠӪӬӴӷӸԒԔ"  # letters of other Cyrillic alphabets
    "ҨԄԆԈԘԠ"  # Abkhaz and Komi letters
)

#: Characters left out because they look like a character of the pretraining set
#: (clbench.pretrain.glyphs.CHARACTERS): pretraining character -> its look-alikes.
LATIN_LOOKALIKES: dict[str, str] = {
    "A": "ΑАѦӔ",
    "a": "аӕ",
    "B": "ΒВв",
    "b": "Ьь",
    "C": "СϹϾҪҀ",
    "c": "сϲͼҫ",
    "E": "ΕЕ",
    "e": "еҼҽ",
    "F": "ϜҒӺ",
    "f": "ϝғӻ",
    "G": "Ԍ",
    "H": "ΗНҢңӇӈӉӊԊԋԢԣ",
    "h": "Һһћ",
    "I": "ΙІӀӏ",
    "i": "і",
    "l": "ι1",
    "J": "Ј",
    "j": "јϳ",
    "K": "ΚКкκҚқҞҟҠҡӃӄϏԞ",
    "M": "ΜМмϺϻӍ",
    "N": "Ν",
    "n": "ΠПп",
    "O": "ΟОѺѸ0",
    "o": "οо",
    "P": "ΡРҎ",
    "p": "ρрϱϼҏ",
    "Q": "Ԛ",
    "q": "ԛ",
    "r": "ΓГгЃҐґ",
    "S": "Ѕ",
    "s": "ѕ",
    "T": "ΤТтҬҭͲͳԎ",
    "U": "Џ",
    "u": "υџи",
    "V": "Ѵ",
    "v": "νѵ",
    "W": "Ԝ",
    "w": "ԝ",
    "X": "ΧХхҲҳӼӾ",
    "x": "χϰϗ",
    "Y": "ΥУҮҰϒ",
    "y": "уүұ",
    "Z": "Ζ",
}

#: Characters left out because, fitted into the square box and counted in 4x4 blocks, they
#: make the same or nearly the same images as a class that is kept (the other case of a
#: Cyrillic letter, a twin in the other script, a variant or the same letter with another
#: diacritic): left out -> the class kept.
SAME_IMAGE: dict[str, str] = {
    **{c: c.upper() for c in "джйлцчшщъыэюяљњѥѩѫѭѯѽҋҙҥҧҵҷәӛӝӟӡӫӭӵӹԓԕҩԅԇԉԙԡ"},
    "б": "6",
    "З": "3",
    "з": "3",
    "θ": "Θ",
    "ϴ": "Θ",
    "Ѳ": "Θ",
    "ѳ": "Θ",
    "Ө": "Θ",
    "ө": "Θ",
    "ϕ": "Φ",
    "Ф": "Φ",
    "ф": "Φ",
    "ψ": "Ψ",
    "Ѱ": "Ψ",
    "ѱ": "Ψ",
    "Ώ": "Ω",
    "Ѡ": "ω",
    "ѡ": "ω",
    "Ѿ": "ώ",
    "ѿ": "ώ",
    "ϵ": "Є",
    "є": "Є",
    "Ԑ": "ε",
    "ԑ": "ε",
    "Ͻ": "ͻ",
    "Ͽ": "ͽ",
    "ϙ": "Ϙ",
    "Ϛ": "ς",
    "ϛ": "ς",
    "ϸ": "Ϸ",
    "ͱ": "Ͱ",
    "Ͷ": "И",
    "ͷ": "И",
    "Ӥ": "Й",
    "ӥ": "Й",
    "Ӂ": "Ӝ",
    "ӂ": "Ӝ",
    "Ҹ": "Ч",
    "ҹ": "Ч",
    "Җ": "Ж",
    "җ": "Ж",
    "Ҕ": "Ђ",
    "ҕ": "Ђ",
    "Ӌ": "Ҷ",
    "ӌ": "Ҷ",
    "Ӷ": "ӷ",
    "Ҍ": "Ѣ",
    "ҍ": "ѣ",
}

#: Bumped whenever the rendering or sampling of the scenario changes (cache key).
RENDER_VERSION = 1


def glyph_name(char: str) -> str:
    """The Unicode name of a class, e.g. ``GREEK CAPITAL LETTER DELTA``."""
    return unicodedata.name(char)


@dataclass
class SplitGlyphsConfig:
    name: str = "split_glyphs"
    n_experiences: int = 10
    # PILOT's uneven split: init_cls classes in the first experience, then increment each;
    # 0 / 0: an even split into n_experiences (clbench.scenarios.base.class_split)
    init_cls: int = 0
    increment: int = 0
    # class order: np.random.seed(seed); np.random.permutation(100) (PILOT's shuffle)
    class_order_seed: int = 1993
    render_seed: int = 0  # train renderings: generator 2*seed, test: 2*seed + 1
    train_per_class: int = 60
    test_per_class: int = 20

    def __post_init__(self) -> None:
        check_positive("scenario.n_experiences", self.n_experiences, allow_zero=True)
        check_seed("scenario.class_order_seed", self.class_order_seed)
        check_seed("scenario.render_seed", self.render_seed)
        check_positive("scenario.train_per_class", self.train_per_class)
        check_positive("scenario.test_per_class", self.test_per_class)
        self.sizes()  # one ConfigError line if the split does not fit

    def sizes(self) -> list[int]:
        """Classes per experience (:func:`~clbench.scenarios.base.class_split`)."""
        return class_split(len(GLYPHS), self.n_experiences, self.init_cls, self.increment)


def _software() -> dict[str, str]:
    """Versions that can change a rendering (font files ship with matplotlib)."""
    return {
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "freetype": str(features.version("freetype2")),
        "matplotlib": matplotlib.__version__,
    }


def cache_path(render_seed: int, train_per_class: int, test_per_class: int) -> Path:
    """Where the renderings of this setting are cached (clbench's cache directory)."""
    from clbench.pretrain.glyphs import FONT_FILES
    from clbench.pretrain.train import cache_dir

    key = {
        "version": RENDER_VERSION,
        "glyphs": GLYPHS,
        "fonts": list(FONT_FILES),
        "render_seed": render_seed,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "software": _software(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "scenarios" / f"split_glyphs-{digest}.safetensors"


def render_glyphs(
    render_seed: int, train_per_class: int, test_per_class: int
) -> dict[str, torch.Tensor]:
    """Freshly rendered ``train_counts`` / ``test_counts`` (uint8 (N, 8, 8) block counts,
    levels 0..16) and ``train_labels`` / ``test_labels``, sorted by class."""
    from clbench.pretrain.glyphs import CharacterSetSource

    source = CharacterSetSource(GLYPHS)
    out = {}
    for split, per_class, seed in (
        ("train", train_per_class, 2 * render_seed),
        ("test", test_per_class, 2 * render_seed + 1),
    ):
        classes = torch.arange(len(GLYPHS)).repeat_interleave(per_class)
        counts, labels = source.sample_counts(
            len(classes), torch.Generator().manual_seed(seed), classes
        )
        out[f"{split}_counts"] = counts.to(torch.uint8).contiguous()
        out[f"{split}_labels"] = labels.contiguous()
    return out


def load_glyphs(
    render_seed: int, train_per_class: int, test_per_class: int
) -> dict[str, torch.Tensor]:
    """:func:`render_glyphs`, read from the cache when it was rendered before (a missing
    or unreadable cache file is rendered again and rewritten)."""
    from clbench.pretrain.train import _save_atomic

    path = cache_path(render_seed, train_per_class, test_per_class)
    if path.is_file():
        try:  # safetensors: tensors and a JSON header, nothing is unpickled
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError):
            pass  # rendered again below
    start = time.perf_counter()
    tensors = render_glyphs(render_seed, train_per_class, test_per_class)
    metadata = {
        "format": f"clbench.split_glyphs/{RENDER_VERSION}",
        "render_seconds": f"{time.perf_counter() - start:.2f}",
        **{k: str(v) for k, v in _software().items()},
    }
    _save_atomic(tensors, metadata, path)
    return tensors


def class_order(seed: int, n: int = len(GLYPHS)) -> list[int]:
    """PILOT's class order: ``np.random.seed(seed); np.random.permutation(n)`` (numpy's
    legacy generator, drawn without touching the global one)."""
    return np.random.RandomState(seed).permutation(n).tolist()


def split_glyphs(cfg: SplitGlyphsConfig) -> Scenario:
    """Class-incremental split of 100 rendered Greek, Cyrillic and digit glyphs."""
    data = load_glyphs(cfg.render_seed, cfg.train_per_class, cfg.test_per_class)
    order = class_order(cfg.class_order_seed)
    benchmark = class_incremental_from_tensors(
        to_model_input(data["train_counts"]),
        data["train_labels"],
        to_model_input(data["test_counts"]),
        data["test_labels"],
        order,
        cfg.sizes(),
    )
    return Scenario(
        name="split_glyphs",
        kind="class_incremental",
        benchmark=benchmark,
        class_names=[GLYPHS[c] for c in order],
        input_shape=(CHANNELS, INPUT_SIZE, INPUT_SIZE),
    )


split_glyphs.Config = SplitGlyphsConfig  # type: ignore[attr-defined]
