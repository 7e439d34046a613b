"""Two ranks on the CPU with gloo, started by torchrun: DDP equals one process, FSDP2 shards."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memfit
from memfit.cli.main import main
from memfit.workload import Mode, Workload

STEPS, BATCH, SEQ = 20, 4, 32


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def single():
    """One process, batch 4, fp32 AdamW: the reference run."""
    return memfit.train("tiny-llama", steps=STEPS, batch=BATCH, seq=SEQ, device="cpu")


def test_ddp_on_two_ranks_gives_the_single_process_losses(single, capfd):
    assert main(["train", "--model", "tiny-llama", "--steps", str(STEPS), "--batch", str(BATCH), "--seq", str(SEQ),
                 "--recipe", "ddp", "--nproc", "2", "--device", "cpu", "--json"]) == 0
    # the children inherit stdout: their JSON line is in this process's captured output
    data = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    losses = torch.tensor(data["losses"], dtype=torch.float64)
    reference = torch.tensor(single.losses, dtype=torch.float64)
    assert len(losses) == STEPS
    assert ((losses - reference).abs() / reference).max() < 1e-4
    assert len(data["peak_bytes"]) == 2
    predicted = memfit.estimate("tiny-llama", "ddp", Workload(mode=Mode.TRAIN, batch_size=BATCH, seq_len=SEQ,
                                                             ranks=2)).peak_bytes
    for peak in data["peak_bytes"]:
        assert abs(predicted - peak) <= 0.05 * peak, (predicted, peak)


SCRIPT = """\
import json, os, sys
import memfit
result = memfit.train("tiny-llama", steps={steps}, batch={batch}, seq={seq}, recipe="fsdp", device="cpu",
                      out=sys.argv[1])
with open(os.path.join(sys.argv[1], "rank-%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({{"losses": result.losses, "peak": result.peak_bytes, "by_category": result.report.by_category}}, f)
"""


def test_fsdp_on_two_ranks_shards_weights_gradients_and_optimizer_state(single, tmp_path):
    script = tmp_path / "fsdp_run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(steps=STEPS, batch=BATCH, seq=SEQ)))
    out = tmp_path / "run"
    _torchrun(str(script), str(out))
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    held = lambda c: c["parameters"] + c["gradients"] + c["optimizer_state"]  # noqa: E731
    whole = held(single.report.by_category)
    predicted = memfit.estimate("tiny-llama", "fsdp", Workload(mode=Mode.TRAIN, batch_size=BATCH, seq_len=SEQ,
                                                              ranks=2))
    for rank in ranks:
        assert held(rank["by_category"]) <= 0.55 * whole, (held(rank["by_category"]), whole)
        assert abs(predicted.peak_bytes - rank["peak"][0]) <= 0.05 * rank["peak"][0]
        losses = torch.tensor(rank["losses"], dtype=torch.float64)
        assert ((losses - torch.tensor(single.losses, dtype=torch.float64)).abs() / losses).max() < 1e-4
    # the shards were gathered into one ordinary checkpoint: it loads in one process and computes
    # what the single-process run's model computes
    loaded, _ = memfit.load(out / "model")
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, single.model.eval()(ids).logits, rtol=1e-3, atol=1e-3)


def _kill_ranks_of(out: Path) -> None:
    """SIGKILL every process whose command line names ``out`` (torchrun's ranks outlive its agent)."""
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


RESUMABLE = """\
import json, logging, os, sys
import memfit
logging.basicConfig(level=logging.INFO)  # "resumed from ..." on stderr
result = memfit.train("tiny-llama", steps=6, batch=4, seq=32, recipe="fsdp", device="cpu", out=sys.argv[1],
                      save_every=3, resume=sys.argv[2] == "resume")
if os.environ["RANK"] == "0":
    print(json.dumps({"losses": result.losses}))
"""


def test_a_sharded_run_killed_while_writing_resumes_to_the_same_loss(tmp_path):
    import signal

    from memfit.train import checkpoint

    # torchrun on a script rather than `memfit train --nproc 2` (the DDP test above runs that path):
    # one process fewer to start at each launch
    script = tmp_path / "resumable.py"
    script.write_text(RESUMABLE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(tmp_path / "killed")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted reference in one process: sharded losses equal it to about 1e-7 (the test above)
    expected = memfit.train("tiny-llama", steps=6, batch=4, seq=32, device="cpu").losses

    killed = subprocess.Popen([*command, "fresh"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env={**env, checkpoint.STALL_ENV: "6"})
    line = ""
    while "stalled writing checkpoint 6" not in line:
        line = killed.stderr.readline()
        assert line or killed.poll() is None, "the run ended before stalling"
    os.killpg(killed.pid, signal.SIGKILL)  # torchrun
    killed.wait()
    _kill_ranks_of(tmp_path / "killed")  # the ranks run in sessions of their own
    root = tmp_path / "killed" / "checkpoints"
    assert [p.name for p in checkpoint.complete(root)] == ["step-3"]
    # resuming restores the DTensor shards of the weights and of AdamW's moments on each rank
    resumed = subprocess.run([*command, "resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.count(f"resumed from {root / 'step-3'}") == 2  # each rank
    losses = json.loads(resumed.stdout.strip().splitlines()[-1])["losses"]
    assert len(losses) == 6
    assert abs(losses[-1] - expected[-1]) <= 1e-5 * abs(expected[-1])


@pytest.mark.parametrize("cached", [False, True], ids=["teacher", "teacher-cache"])
def test_distillation_on_two_ranks_gives_the_single_process_losses(capfd, tmp_path, cached):
    common = dict(steps=4, batch=BATCH, seq=SEQ, device="cpu")
    cache = {"teacher_cache": str(tmp_path / "single-cache"), "top_k": 16} if cached else {}
    reference = memfit.distill("tiny-llama", "drop-layers-1", **common, **cache).losses
    flags = ["--teacher-cache", str(tmp_path / "cache"), "--top-k", "16"] if cached else []
    assert main(["distill", "--teacher", "tiny-llama", "--student", "drop-layers-1", "--steps", "4", "--batch",
                 str(BATCH), "--seq", str(SEQ), "--recipe", "ddp", "--nproc", "2", "--device", "cpu", *flags,
                 "--json"]) == 0
    data = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    losses = torch.tensor(data["losses"], dtype=torch.float64)
    assert len(losses) == 4 and len(data["peak_bytes"]) == 2
    assert ((losses - torch.tensor(reference, dtype=torch.float64)).abs() / losses).max() < 1e-4
    if cached:  # built once, by the launching process, before the ranks started
        assert data["teacher_cache_bytes_per_token"] == 16 * 4
