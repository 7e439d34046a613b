"""CUDA paths, run on a GPU machine; skipped without CUDA."""

import pytest
import torch

import memfit
from memfit.profile import profile
from memfit.workload import Mode, Workload

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
    plan = memfit.Plan.parse("bf16-autocast,checkpointing")
    memfit.apply(model, plan)
    model.to("cuda")
    assert predicted == profile(model, workload, plan.run)


@pytest.mark.parametrize("recipe", ["adamw-8bit", "bf16-master,adafactor", "int4-g32,lora-8", "bf16-autocast"])
def test_cuda_training_peak_is_predicted(recipe):
    # the tracker against the CUDA allocator is test_tracked_peak_agrees_with_the_cuda_allocator's
    workload = Workload(mode=Mode.TRAIN, batch_size=2, seq_len=128, device="cuda")
    model, tokenizer = memfit.load("tiny-llama")
    predicted = memfit.estimate(model, recipe, workload).peak_bytes
    result = memfit.train(model, tokenizer, steps=3, batch=2, seq=128, recipe=recipe, device="cuda")
    assert result.peak_bytes[0] == pytest.approx(predicted, rel=0.01)


def test_cuda_out_of_memory_retries_with_a_smaller_micro_batch():
    # a real CUDA OOM: cap this process's share of the GPU just above what micro-batch 1 needs
    model, tokenizer = memfit.load("tiny-llama")
    workload = lambda batch: Workload(mode=Mode.TRAIN, batch_size=batch, seq_len=2048, device="cuda")  # noqa: E731
    one = memfit.estimate(model, "none", workload(1)).peak_bytes
    eight = memfit.estimate(model, "none", workload(8)).peak_bytes
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((one + eight) / 2 / total)
    try:
        result = memfit.train(model, tokenizer, steps=2, batch=8, seq=2048, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert len(result.losses) == 2
    assert result.peak_bytes[0] < (one + eight) / 2


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_ddp_and_fsdp_match_one_process(tmp_path):
    import json
    import subprocess
    import sys

    single = memfit.train("tiny-llama", steps=10, batch=4, seq=64, device="cuda").losses
    for recipe in ("ddp", "fsdp"):
        done = subprocess.run([sys.executable, "-m", "memfit.cli.main", "train", "--model", "tiny-llama",
                               "--steps", "10", "--batch", "4", "--seq", "64", "--recipe", recipe, "--nproc", "2",
                               "--device", "cuda", "--json"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        losses = json.loads(done.stdout.strip().splitlines()[-1])["losses"]
        assert max(abs(a - b) / b for a, b in zip(losses, single, strict=True)) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_runtime_with_cuda_graphs_decodes_transformers_greedy_tokens(make_tiny, dtype):
    from memfit.runtime import Engine

    model, _ = make_tiny("tiny-llama")
    model.to("cuda", dtype)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=64, min_new_tokens=64,
                              do_sample=False)[0, 12:].tolist()
    engine = Engine(model, compile=True)
    assert [s.tokens[0] for s in engine.stream([prompt], 64)] == expected
    assert engine.compiled
    assert [s.tokens[0] for s in engine.stream([prompt], 64)] == expected  # graphs replayed


def test_the_runtime_decodes_packed_int8_on_cuda(make_tiny):
    from memfit.runtime import Engine

    model, _ = make_tiny("tiny-qwen2")
    memfit.apply(model, "int8")
    model.to("cuda")
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False)[0, 9:].tolist()
    assert [s.tokens[0] for s in Engine(model, compile=True).stream([prompt], 32)] == expected
