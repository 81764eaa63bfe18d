"""A small-budget run of examples/train_digits.py: both binary models must actually learn.

The full example trains for minutes; here the ViT is smaller (dim 32, depth 2, 4 heads of 8) and the
epochs few, so the accuracies are lower than the example's but far from chance (10 classes: 10%).
Thresholds were set from runs of this exact budget (seed 0) with a wide margin below what they reach,
and far above what a broken gradient path gives: a BinaryAttention model whose fine-tuning does
nothing stays at its post-conversion accuracy, and a BinaryFormer model that does not learn stays
near 10%.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"


def _load_example():
    if not EXAMPLE.exists():
        pytest.skip(f"{EXAMPLE} not found (tests run outside the source tree)")
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_digits_binary_models_learn(device):
    td = _load_example()
    cfg = td.Config(
        float_recipe=td.Recipe(epochs=12, lr=3e-3, warmup_epochs=1),
        qat_recipe=td.Recipe(epochs=4, lr=1e-3, warmup_epochs=1),
        binaryformer_recipe=td.Recipe(epochs=12, lr=3e-3, warmup_epochs=1),
        dim=32, depth=2, num_heads=4,
    )
    data = td.load_digits_split()
    assert len(data[1]) == 1437 and len(data[3]) == 360
    results = td.run_seed(cfg, seed=0, data=data, device=torch.device(device), log=False)
    acc = {name: r["test_accuracy"] for name, r in results.items()}
    print(acc)

    assert acc["float"] > 0.85, acc
    # Fine-tuning with distillation must recover most of what the conversion lost.
    assert acc["binary_attention"] > 0.80, acc
    assert acc["binary_attention"] > acc["binary_attention_before_finetune"] + 0.05, acc
    # BinaryFormer from scratch, with no gradient through the signs, still learns.
    assert acc["binaryformer"] > 0.60, acc
