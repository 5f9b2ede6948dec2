"""Super-resolution conditioning: the model decides how its input is put on the output grid."""

import numpy as np
import pytest
import torch
from skimage.transform import rescale

from emdiffuse.errors import InputError
from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.presets import make_config


def test_bilinear_matches_an_independent_half_pixel_interpolation():
    rng = np.random.default_rng(0)
    image = rng.uniform(-0.9, 0.9, (12, 10)).astype(np.float32)
    ours = upsample_xy(torch.from_numpy(image)[None, None], 2, "bilinear")[0, 0].numpy()
    # scikit-image: pixel-centre (half-pixel) coordinates, edge values repeated, no smoothing.
    theirs = rescale(image, 2, order=1, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_bicubic_differs_and_is_clamped():
    x = torch.tensor([[[[-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]]])
    bicubic = upsample_xy(x, 4, "bicubic")
    bilinear = upsample_xy(x, 4, "bilinear")
    assert bicubic.shape == bilinear.shape == (1, 1, 8, 12)
    assert float(bicubic.abs().max()) <= 1.0
    assert not torch.allclose(bicubic, bilinear)


def test_5d_tiles_are_upsampled_slice_by_slice():
    x = torch.randn(2, 1, 3, 4, 4).clamp(-1, 1)
    up = upsample_xy(x, 2, "bilinear")
    assert up.shape == (2, 1, 3, 8, 8)
    torch.testing.assert_close(up[:, :, 1], upsample_xy(x[:, :, 1], 2, "bilinear"))


def test_enhancer_uses_the_models_setting():
    config = make_config("emdiffuse-r", size="tiny", scale_factor=2).replace(
        cond_upsample="bilinear"
    )
    enhancer = Enhancer.from_config(config)
    cond = torch.rand(1, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(enhancer._upsample(cond), upsample_xy(cond, 2, "bilinear"))
    assert make_config("emdiffuse-r", size="tiny", scale_factor=2).cond_upsample == "bicubic"


def test_unknown_mode_refused():
    with pytest.raises(InputError, match="cond_upsample"):
        make_config("emdiffuse-r", size="tiny", scale_factor=2).replace(cond_upsample="nearest")
    with pytest.raises(ValueError, match="upsampling"):
        upsample_xy(torch.zeros(1, 1, 2, 2), 2, "lanczos")
