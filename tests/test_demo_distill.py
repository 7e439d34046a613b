"""Distilling the demo model (SmolLM2-135M) at a scale CI affords; the full-scale table is in
docs/benchmarks.md (benchmarks/distill.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import memfit
from memfit.data import eval_text, token_windows
from memfit.train.distill import distill, estimate_distill
from memfit.workload import Mode, Workload

pytestmark = pytest.mark.slow


def test_a_cached_demo_distillation_is_predicted_and_saves_a_plain_transformers_checkpoint(tmp_path):
    # drop-layers-6 from the fp32 teacher through a top-64 teacher cache: the cache's 256 bytes per
    # token (uint16 ids: 49,152 tokens), no teacher in memory, the predicted step, a student that
    # transformers loads without memfit and scores as memfit does
    # no --out: the final checkpoint's CPU snapshot would count in the tracked peak, as in training
    result = distill("demo", "drop-layers-6", steps=2, batch=2, seq=64, lr=1e-4, device="cpu",
                     teacher_cache=tmp_path / "cache", top_k=64)
    assert result.teacher_cache_bytes_per_token == 256
    assert result.model.config.num_hidden_layers == 24
    predicted = estimate_distill("demo", "drop-layers-6", Workload(mode=Mode.TRAIN, batch_size=2, seq_len=64),
                                 top_k=64).peak_bytes
    assert abs(predicted - result.peak_bytes[0]) <= 0.03 * result.peak_bytes[0]
    student_bytes = sum(p.numel() * 4 for p in result.model.parameters())
    assert result.peak_bytes[0] < 5 * student_bytes  # weights, gradients, AdamW's two moments: no teacher

    saved = tmp_path / "model"
    memfit.save(result.model.eval(), memfit.io.load_tokenizer("demo"), saved)  # what distill --out DIR writes
    ours = memfit.evaluate(*memfit.load(saved), num_tokens=1024, measure_speed=False).perplexity
    script = (
        "import json, sys, torch, transformers\n"
        "sys.modules['memfit'] = None  # transformers alone\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(saved)!r}, dtype=torch.float32).eval()\n"
        "ids = torch.tensor(json.loads(sys.stdin.read()))\n"
        "with torch.no_grad():\n"
        "    losses = [model(w[None], labels=w[None]).loss.item() for w in ids]\n"
        "print(json.dumps(losses))\n"
    )
    windows = token_windows(memfit.io.load_tokenizer(saved), eval_text(), 1024, 512)  # what evaluate scores
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(windows.tolist()), capture_output=True,
                          text=True, check=True)
    losses = json.loads(done.stdout.strip().splitlines()[-1])
    theirs = math.exp(sum(losses) / len(losses))
    assert theirs == pytest.approx(ours, rel=1e-4)
