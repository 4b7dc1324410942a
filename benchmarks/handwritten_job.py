"""The default ``clbench run`` job written by hand: the baseline of benchmarks/bench_job.py.

Same work as clbench's embedded default (split_digits x lora x micro_vit): scikit-learn's
digits, stratified 70/30 split (seed 0), class order drawn with seed 1993, 5 experiences
of 2 classes; the micro ViT (timm VisionTransformer) loaded from clbench's pretrained
glyph checkpoint, frozen, with LoRA (rank 8, alpha 16, A kaiming-uniform(a=sqrt(5)), B = 0)
on every qkv, proj, fc1 and fc2; a linear head that grows by 2 units per experience;
per experience 5 epochs of batches of 32, a fresh Adam (lr 3e-4) over LoRA + head, the
cross-entropy over the current experience's classes; after each experience every test
experience is evaluated (batches of 256). Writes OUT/results.json (accuracy matrix,
final accuracy, average incremental accuracy, forgetting) and logs one MLflow run.

The checkpoint is clbench's product, not part of the comparison: when ``--checkpoint`` is
not given, the script asks ``clbench.pretrain.train`` for its cached file (made by
``ensure_pretrained``, i.e. clbench's pretraining, if missing; CLBENCH_CACHE_DIR is
respected). Nothing else of clbench (nor Avalanche or Hydra) is used.

    python benchmarks/handwritten_job.py --out DIR --tracking-uri URI [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.models.vision_transformer import VisionTransformer
from torch import nn

SEED, SPLIT_SEED, ORDER_SEED = 0, 0, 1993
N_EXP, EPOCHS, BATCH, EVAL_BATCH, LR = 5, 5, 32, 256, 3e-4
RANK, ALPHA, TARGETS = 8, 16.0, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ARCH = dict(img_size=16, patch_size=4, in_chans=1, num_classes=0, global_pool="token")
ARCH |= dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)


class LoRALinear(nn.Module):
    """A frozen linear plus ``alpha / rank * B A x``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scale


def load_experiences() -> tuple[list, list]:
    """[(x, y)] per experience for train and test; labels are positions in the class order."""
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)).div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
    labels = digits.target
    tr, te = train_test_split(
        np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=SPLIT_SEED
    )
    order = np.random.default_rng(ORDER_SEED).permutation(10)
    y = torch.from_numpy(np.argsort(order)[labels])  # class -> its position in the order

    def split(idx: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        xs, ys = x[idx], y[idx]
        return [(xs[ys // 2 == t], ys[ys // 2 == t]) for t in range(N_EXP)]

    return split(tr), split(te)


def build_model(checkpoint: Path) -> tuple[VisionTransformer, nn.Linear]:
    """The pretrained micro ViT, frozen, with LoRA on the targets; an empty linear head."""
    vit = VisionTransformer(**ARCH)
    tensors = load_file(str(checkpoint))
    vit.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("glyph_head.")})
    vit.requires_grad_(False)
    for target in TARGETS:
        parent, attr = target.split(".")
        for block in vit.blocks:
            module = getattr(block, parent)
            setattr(module, attr, LoRALinear(getattr(module, attr), RANK, ALPHA))
    with warnings.catch_warnings():  # torch warns when initialising a 0-unit layer
        warnings.simplefilter("ignore", UserWarning)
        return vit, nn.Linear(vit.embed_dim, 0)


def grow(head: nn.Linear, n: int) -> nn.Linear:
    """A head with ``n`` outputs whose first units are ``head``'s."""
    new = nn.Linear(head.in_features, n)
    with torch.no_grad():
        new.weight[: head.out_features] = head.weight
        new.bias[: head.out_features] = head.bias
    return new


@torch.no_grad()
def accuracy(vit: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    hits = sum(
        int((head(vit(x[i : i + EVAL_BATCH])).argmax(1) == y[i : i + EVAL_BATCH]).sum())
        for i in range(0, len(y), EVAL_BATCH)
    )
    return hits / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    checkpoint = args.checkpoint
    if checkpoint is None:  # clbench's cached source model (its pretraining if missing)
        from clbench.pretrain.train import ensure_pretrained

        checkpoint = ensure_pretrained(progress=False)

    torch.manual_seed(SEED)
    train, test = load_experiences()
    vit, head = build_model(checkpoint)
    gen = torch.Generator().manual_seed(SEED)
    matrix = []
    for t, (x, y) in enumerate(train):
        head = grow(head, 2 * (t + 1))
        lora = [p for p in vit.parameters() if p.requires_grad]
        opt = torch.optim.Adam([*lora, *head.parameters()], lr=LR)
        mask = torch.full((2 * (t + 1),), float("-inf"))
        mask[2 * t :] = 0.0  # cross-entropy over the current experience's classes
        vit.train()
        for _ in range(EPOCHS):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), BATCH):
                idx = perm[i : i + BATCH]
                loss = F.cross_entropy(head(vit(x[idx])) + mask, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        vit.eval()
        matrix.append([accuracy(vit, head, xe, ye) for xe, ye in test])
        print(f"after experience {t + 1}: " + " ".join(f"{a:.3f}" for a in matrix[-1]))

    r, sizes = np.array(matrix), np.array([len(y) for _, y in test])
    seen = [float(r[t, : t + 1] @ sizes[: t + 1] / sizes[: t + 1].sum()) for t in range(N_EXP)]
    metrics = {
        "final_accuracy": seen[-1],
        "average_incremental_accuracy": float(np.mean(seen)),
        "forgetting": float(np.mean([r[:-1, i].max() - r[-1, i] for i in range(N_EXP - 1)])),
    }
    params = {"scenario": "split_digits", "strategy": "lora", "backbone": "micro_vit"}
    params |= dict(seed=SEED, epochs=EPOCHS, batch_size=BATCH, lr=LR, rank=RANK, alpha=ALPHA)
    params |= {"checkpoint": str(checkpoint), "targets": ",".join(TARGETS)}
    params |= {"threads": torch.get_num_threads()}
    results = {"params": params, "accuracy_matrix": matrix, "test_sizes": sizes.tolist()}
    results |= {"metrics": metrics, "wall_seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("handwritten")
    with mlflow.start_run(run_name="split_digits_lora_s0"):
        mlflow.log_params(params)
        for t, acc in enumerate(seen):
            mlflow.log_metric("accuracy_seen", acc, step=t)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(args.out / "results.json"))
    print(f"final accuracy {metrics['final_accuracy']:.4f}, forgetting {metrics['forgetting']:.4f}")
    print(f"wall {time.perf_counter() - start:.1f}s, results in {args.out}")


if __name__ == "__main__":
    main()
