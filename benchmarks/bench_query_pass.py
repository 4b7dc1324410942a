"""What the prompt learners' query pass costs, and what the query cache saves.

    python benchmarks/bench_query_pass.py

On the embedded default (pretrained micro ViT, split_digits experience 0) for l2p,
dualprompt and coda_prompt with their conf/strategy defaults but 5 epochs each,
interleaving repeats:
- training: seconds per optimiser step over 5 epochs with ``query_cache`` on and off
  (same init, same batch order); with the cache the frozen query pass runs in the first
  epoch only;
- prediction: seconds per 256-image batch for the query pass alone, the prompted pass
  alone and the full prediction (query + prompted): the share the query pass costs at
  test time, where it cannot be cached for new inputs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

import clbench.backbones.embedded  # noqa: F401  (registers micro_vit)
from clbench.adapters.prompts import query_features
from clbench.config import compose, validate
from clbench.models import ClassifierModel
from clbench.registry import BACKBONES, SCENARIOS, STRATEGIES

REPEATS = 5


def build(name: str, cache: bool):
    torch.manual_seed(0)
    backbone = BACKBONES.get("micro_vit")(BACKBONES.get("micro_vit").Config())
    vit = backbone.module
    cls = STRATEGIES.get(name)
    cfg = replace(validate(compose([f"strategy={name}"]))["strategy"], epochs=5, query_cache=cache)
    return cls(model=ClassifierModel(vit, vit.num_features), cfg=cfg, n_experiences=5)


def train_seconds_per_step(name: str, cache: bool, experience) -> float:
    st = build(name, cache)
    t0 = time.perf_counter()
    st.train(experience, eval_streams=[])
    steps = st.clock.train_iterations
    return (time.perf_counter() - t0) / steps


def predict_seconds(name: str, experience, x: torch.Tensor) -> tuple[float, float, float]:
    st = build(name, True)
    st.train(experience, eval_streams=[])
    st.model.eval()
    st.is_training = False
    with torch.no_grad():
        t0 = time.perf_counter()
        q = query_features(st.vit, x)
        t1 = time.perf_counter()
        st.features(x, q)
        t2 = time.perf_counter()
        st.model.head(st.features(x, query_features(st.vit, x)))
        t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    build_sc = SCENARIOS.get("split_digits")
    scenario = build_sc(build_sc.Config())
    experience = scenario.train_stream[0]
    x = torch.stack([scenario.test_stream[0].dataset[i][0] for i in range(100)])
    x = x.repeat(3, 1, 1, 1)[:256]
    print(
        "| strategy | s/step cache on | s/step cache off | saved | query pass / 256 | "
        "prompted pass / 256 | prediction / 256 | query share of prediction |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("l2p", "dualprompt", "coda_prompt"):
        on, off, qs, ps, full = [], [], [], [], []
        for _ in range(REPEATS):
            on.append(train_seconds_per_step(name, True, experience))
            off.append(train_seconds_per_step(name, False, experience))
            q, p, f = predict_seconds(name, experience, x)
            qs.append(q)
            ps.append(p)
            full.append(f)
        m = statistics.median
        print(
            f"| {name} | {m(on) * 1e3:.1f} ms | {m(off) * 1e3:.1f} ms | "
            f"{1 - m(on) / m(off):.0%} | {m(qs) * 1e3:.1f} ms | {m(ps) * 1e3:.1f} ms | "
            f"{m(full) * 1e3:.1f} ms | {m(qs) / m(full):.0%} |"
        )


if __name__ == "__main__":
    main()
