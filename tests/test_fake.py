"""Running real code on fake tensors: values a prediction assumes, and kernels replayed by shape."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.memory.fake import is_fake, shape_determined, value_or
from memfit.memory.tracker import track

CALLS = []


@shape_determined
def _kernel(x: torch.Tensor, width: int) -> torch.Tensor:
    """Allocates a [N, width] temporary and a [N, 2 * width] one, keeps neither; returns [N]."""
    CALLS.append(width)
    wide = x[:, None].expand(-1, width).clone()
    wider = torch.cat([wide, wide], dim=1)
    del wide
    return wider.sum(dim=1)


def test_value_or_reads_real_tensors_and_assumes_for_fake_ones():
    assert value_or(torch.tensor(3), 7) == 3 and value_or(torch.tensor([1, 2]), []) == [1, 2]
    with FakeTensorMode():
        fake = torch.empty(2)
        assert is_fake(fake) and value_or(fake, [5, 6]) == [5, 6]
    assert not is_fake(torch.empty(2))


def test_a_shape_determined_kernel_runs_once_per_shape_on_fake_tensors_and_the_peak_is_the_same():
    def peaks(make):
        CALLS.clear()
        with track() as tracker:
            x = make(64)
            outs = [_kernel(x, 8) for _ in range(3)] + [_kernel(x, 16)]
        return tracker.peak_bytes, tracker.live_bytes, list(CALLS), [tuple(o.shape) for o in outs]

    real = peaks(lambda n: torch.ones(n))
    with FakeTensorMode():
        fake = peaks(lambda n: torch.empty(n))
    assert real[2] == [8, 8, 8, 16]  # real tensors always run
    assert fake[2] == [8, 16]  # fake: once per signature, then replayed
    assert fake[0] == real[0] and fake[1] == real[1] and fake[3] == real[3]
    # untracked, the same real calls give the same values
    x = torch.arange(64.0)
    assert torch.equal(_kernel(x, 8), _kernel.__wrapped__(x, 8))
    # x, three [64] results, and the width-16 call's [64, 16] and [64, 32] temporaries; then x and four results
    assert real[0] == 4 * (64 + 3 * 64 + 64 * 16 + 64 * 32) and real[1] == 4 * 5 * 64


def test_real_calls_after_the_first_run_out_of_the_trackers_sight_and_count_the_same():
    """On real tensors the tracker measures a signature's first call and counts later ones from
    it (outputs, and the peak as a block): the figures equal a run that tracks every operator."""
    from memfit.memory.tracker import Tracker

    seen = []
    hook = Tracker.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return hook(self, func, types, args, kwargs)

    def run(kernel):
        seen.clear()
        with track() as tracker:
            x = torch.ones(64)
            outs = [kernel(x, 8) for _ in range(5)]
            total = torch.stack(outs).sum()
        return tracker.peak_bytes, tracker.live_bytes, len(seen), total.item()

    Tracker.__torch_dispatch__ = counting
    try:
        replayed, every = run(_kernel), run(_kernel.__wrapped__)
    finally:
        Tracker.__torch_dispatch__ = hook
    assert replayed[0] == every[0] and replayed[1] == every[1] and replayed[3] == every[3] == 5 * 64 * 16
    assert replayed[2] < every[2] - 3  # four calls' operators were not dispatched through the tracker
