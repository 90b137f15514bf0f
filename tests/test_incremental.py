"""The cached incremental sampler gives the full forward's logits at every position and the same
samples as the naive sampler (issue: fast exact sampling). On the CPU here; on a GPU with
``PIPELINE_TEST_DEVICE=cuda`` (tools/gpu_sampling_check.sh), where cuDNN and TF32 take other paths."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.models.incremental import IncrementalStack
from pipeline.models.priors import BottomPrior, TopPrior
from pipeline.models.sampling import sample_bottom, sample_top

DEVICE = torch.device(os.environ.get("PIPELINE_TEST_DEVICE", "cpu"))


def _top(attn_layers: int) -> TopPrior:
    return TopPrior(num_codes=16, num_classes=5, hidden=32, res_channels=64, layers=4, kernel_size=5,
                    attn_layers=attn_layers, attn_heads=4, out_stack=1).eval().to(DEVICE)


def _bottom(kernel_size: int = 5) -> BottomPrior:
    return BottomPrior(num_codes=16, num_top_codes=16, num_classes=5, hidden=32, res_channels=64, layers=3,
                       kernel_size=kernel_size, cond_blocks=2, out_stack=1).eval().to(DEVICE)


def _randint(high: int, size: tuple) -> torch.Tensor:
    return torch.randint(0, high, size).to(DEVICE)  # drawn on the CPU: the same values on any device


def _max_error(stack, cond, codes: torch.Tensor, full: torch.Tensor) -> float:
    """Teacher-forced: logits at each position before its code is set, against the full forward."""
    state = IncrementalStack(stack, cond, codes.shape[0], tuple(codes.shape[1:]))
    err = 0.0
    for i in range(codes.shape[1]):
        for j in range(codes.shape[2]):
            err = max(err, (state.logits(i, j) - full[:, :, i, j]).abs().max().item())
            state.set(i, j, codes[:, i, j])
    return err


@pytest.mark.parametrize("attn_layers", [0, 2])
@pytest.mark.parametrize("size", [(4, 4), (5, 7)])
def test_top_prior_cached_logits_equal_the_full_forward(attn_layers, size):
    torch.manual_seed(attn_layers * 10 + size[1])
    model = _top(attn_layers)
    codes, classes = _randint(16, (3, *size)), _randint(5, (3,))
    with torch.no_grad():
        full = model(codes, classes)
        assert _max_error(model.stack, model.conditions(classes), codes, full) <= 1e-4


@pytest.mark.parametrize("size,kernel", [((6, 6), 5), ((8, 5), 3)])
def test_bottom_prior_cached_logits_equal_the_full_forward(size, kernel):
    torch.manual_seed(size[0])
    model = _bottom(kernel)
    codes, classes = _randint(16, (2, *size)), _randint(5, (2,))
    top = _randint(8, (2, size[0] // 2, (size[1] + 1) // 2))
    with torch.no_grad():
        full = model(codes, top, classes)
        cond = model.conditions(model.condition(top, size), classes)
        assert _max_error(model.stack, cond, codes, full) <= 1e-4


def test_a_wrong_cache_would_be_caught():
    """The comparison is sensitive: logits from another prefix differ far beyond the tolerance."""
    torch.manual_seed(1)
    model = _top(1)
    codes, classes = _randint(16, (2, 4, 4)), _randint(5, (2,))
    with torch.no_grad():
        other = model(torch.roll(codes, 1, dims=2), classes)
        assert _max_error(model.stack, model.conditions(classes), codes, other) > 1e-2


@pytest.mark.parametrize("attn_layers", [0, 1])
def test_cached_and_naive_sampling_draw_identical_codes(attn_layers):
    torch.manual_seed(3)
    top, bottom = _top(attn_layers), _bottom()
    classes = torch.tensor([0, 1, 4, 2], device=DEVICE)
    maps = {}
    for method in ("naive", "cached"):
        g = torch.Generator(DEVICE).manual_seed(11)
        t = sample_top(top, classes, (4, 4), generator=g, method=method, temperature=0.9, top_p=0.95)
        maps[method] = (t, sample_bottom(bottom, t, classes, (8, 8), generator=g, method=method))
    assert torch.equal(maps["naive"][0], maps["cached"][0])
    assert torch.equal(maps["naive"][1], maps["cached"][1])
    assert len(torch.unique(maps["cached"][1])) > 4  # real samples, not a constant map


def test_the_cached_sampler_under_bf16_autocast_as_sample_runs_it_on_a_gpu():
    """On a GPU `sample` runs the priors under bf16 autocast. CPU autocast takes the same bf16 matmul
    and convolution paths: the fp32 caches take bf16 rows, the logits stay within bf16 rounding of the
    full forward's under the same autocast (a wrong prefix is ~100x further off), and it samples."""
    torch.manual_seed(5)
    top, bottom = _top(2), _bottom()
    codes, classes = _randint(16, (3, 5, 7)), _randint(5, (3,))
    top_codes, size = _randint(8, (3, 3, 4)), (6, 8)
    bottom_codes = _randint(16, (3, *size))
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        full, wrong = top(codes, classes), top(torch.roll(codes, 1, dims=2), classes)
        assert full.dtype == torch.bfloat16  # autocast did reach the prior
        assert _max_error(top.stack, top.conditions(classes), codes, full) <= 0.05
        assert _max_error(top.stack, top.conditions(classes), codes, wrong) > 0.5
        cond = bottom.conditions(bottom.condition(top_codes, size), classes)
        assert _max_error(bottom.stack, cond, bottom_codes, bottom(bottom_codes, top_codes, classes)) <= 0.05
        g = torch.Generator(DEVICE).manual_seed(11)
        t = sample_top(top, classes, (4, 4), generator=g)
        b = sample_bottom(bottom, t, classes, (8, 8), generator=g)
    assert b.shape == (3, 8, 8) and b.dtype == torch.long and 0 <= b.min() and b.max() < 16
    assert len(torch.unique(b)) > 4
