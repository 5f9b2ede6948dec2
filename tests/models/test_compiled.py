"""torch.compile at one batch size (emdiffuse/models/compiled.py): smaller batches are padded
to the largest seen, so one graph serves a run's full and partial batches, with the
module's own outputs."""

from __future__ import annotations

import torch

from emdiffuse.models.compiled import FixedBatch


class _Small(torch.nn.Module):
    """A real network in miniature: convolution, GroupNorm, SiLU, a per-item noise level."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8)
        self.b = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, level, index=None):
        h = torch.nn.functional.silu(self.norm(self.a(x))) * level[:, None, None, None]
        return self.b(h)


def test_fixed_batch_compiles_once_per_shape_and_matches_the_module():
    torch.manual_seed(0)
    module = _Small().eval()
    fixed = FixedBatch(module)
    with torch.inference_mode():
        for n in (3, 2, 3, 1):  # a full batch, then partial ones: padded, no new graph
            x = torch.randn(n, 2, 16, 16)
            level = torch.rand(()).expand(n)  # as the denoiser passes it: stride 0
            got = fixed(x, level, None)
            assert got.shape == (n, 1, 16, 16)
            torch.testing.assert_close(got, module(x, level, None), rtol=1e-4, atol=1e-5)
        assert fixed.shapes == {(3, 2, 16, 16)}
        for n in (5, 3):  # larger: compiled once more, and then the size padded to
            x, level = torch.randn(n, 2, 16, 16), torch.rand(n)
            torch.testing.assert_close(fixed(x, level), module(x, level), rtol=1e-4, atol=1e-5)
    assert fixed.shapes == {(3, 2, 16, 16), (5, 2, 16, 16)} and fixed.batch == 5


def test_reserve_pads_the_first_small_batch_to_the_runs_size():
    """A run's first call may be smaller than its batch size (a pilot's two tiles):
    reserved, it compiles once at the run's size."""
    torch.manual_seed(1)
    module = _Small().eval()
    fixed = FixedBatch(module)
    fixed.reserve(4)
    with torch.inference_mode():
        for n in (2, 4, 1):
            x, level = torch.randn(n, 2, 8, 8), torch.rand(n)
            torch.testing.assert_close(fixed(x, level), module(x, level), rtol=1e-4, atol=1e-5)
    assert fixed.shapes == {(4, 2, 8, 8)}
