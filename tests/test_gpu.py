"""CUDA paths, run on a GPU machine; skipped without CUDA."""

import pytest
import torch

import memfit
from memfit.memory.workload import profile
from memfit.plan import Mode, Workload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("workload", [
    Workload(batch_size=4, seq_len=512, device="cuda"),
    Workload(mode=Mode.GENERATE, batch_size=4, seq_len=128, new_tokens=16, device="cuda"),
    Workload(mode=Mode.TRAIN, batch_size=4, seq_len=256, device="cuda"),
], ids=["infer", "generate", "train"])
def test_tracked_peak_agrees_with_the_cuda_allocator(make_tiny, workload):
    model, _ = make_tiny("tiny-llama")
    model.to("cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    report = profile(model, workload)
    torch.cuda.synchronize()
    allocator_peak = torch.cuda.max_memory_allocated() - base + memfit.weight_bytes(model)
    # the caching allocator rounds blocks up to 512 bytes; the tracker counts storage bytes
    assert report.peak_bytes == pytest.approx(allocator_peak, rel=0.02)


def test_cuda_prediction_equals_measurement(make_tiny):
    model, _ = make_tiny("tiny-llama")
    workload = Workload(mode=Mode.TRAIN, batch_size=2, seq_len=128, device="cuda")
    predicted = memfit.estimate(model, "bf16-autocast,checkpointing", workload)
    memfit.apply(model, "bf16-autocast,checkpointing")
    model.to("cuda")
    assert predicted == profile(model, workload)
