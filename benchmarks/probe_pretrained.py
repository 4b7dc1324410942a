"""Linear probe of the micro ViT on scikit-learn digits: glyph-pretrained vs random init.

Pretrains into a temporary directory (never the user cache) unless ``--checkpoint`` is
given, then fits a logistic regression on frozen, standardised CLS features
(70/30 stratified split, random_state=0) and prints both accuracies and the timings.

    python benchmarks/probe_pretrained.py [--seed 0] [--steps N] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clbench.backbones.micro_vit import build_micro_vit
from clbench.lowres import to_model_input
from clbench.pretrain.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_STEPS,
    load_micro_vit,
    pretrain_micro_vit,
    read_metadata,
)


@torch.no_grad()
def features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Frozen CLS features of (N, 8, 8) digit images (levels 0..16)."""
    model.eval()
    return model(to_model_input(torch.from_numpy(images))).numpy()


def probe(feats: np.ndarray, labels: np.ndarray) -> float:
    """Test accuracy of a logistic regression on standardised features (70/30 split)."""
    x_tr, x_te, y_tr, y_te = train_test_split(
        feats, labels, test_size=0.3, stratify=labels, random_state=0
    )
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(clf.fit(x_tr, y_tr).score(x_te, y_te))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--checkpoint", type=Path, default=None, help="probe this file instead")
    args = parser.parse_args()

    digits = load_digits()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            start = time.perf_counter()
            path = pretrain_micro_vit(
                seed=args.seed,
                steps=args.steps,
                batch_size=args.batch_size,
                out=Path(tmp) / "micro_vit.safetensors",
            )
            print(f"pretraining wall time: {time.perf_counter() - start:.1f}s")
        meta = read_metadata(path)
        pretrained = load_micro_vit(path)
    print(
        f"source accuracy: {meta['source_accuracy']} ({meta['steps']} steps, seed {meta['seed']})"
    )

    torch.manual_seed(int(meta["seed"]))
    random_init = build_micro_vit()
    acc_pre = probe(features(pretrained, digits.images), digits.target)
    acc_rand = probe(features(random_init, digits.images), digits.target)
    print(f"linear probe on digits: pretrained {acc_pre:.4f}  random init {acc_rand:.4f}")


if __name__ == "__main__":
    main()
