import torch

from dopsd_continual.gate import colour_shift, drift, few_step_gap, ratio, seed_diversity, sharpness_ratio


def _imgs(seed=0, n=8):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_drift_is_zero_for_the_same_images_and_grows_with_change():
    x = _imgs()
    assert drift(x, x) == 0
    assert drift((x + 0.1).clamp(0, 1), x) > drift((x + 0.01).clamp(0, 1), x) > 0


def test_blur_lowers_the_sharpness_ratio():
    x = _imgs()
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    assert sharpness_ratio(x, x) == 1.0
    assert sharpness_ratio(blurred, x) < 0.6


def test_colour_shift_sees_a_tint_and_a_grey_out():
    x = _imgs()
    tinted = x.clone()
    tinted[:, 0] = (tinted[:, 0] + 0.2).clamp(0, 1)
    grey = x.mean(1, keepdim=True).expand_as(x) * 0.5 + 0.25
    assert colour_shift(x, x) == 0
    assert colour_shift(tinted, x) > 0.03 and colour_shift(grey, x) > 0.05


def test_seed_diversity_sees_collapse():
    varied = _imgs(n=8)  # 4 prompts x 2 seeds
    collapsed = varied.view(4, 2, 3, 32, 32)[:, :1].expand(4, 2, 3, 32, 32).reshape(8, 3, 32, 32)
    assert seed_diversity(collapsed, 2) == 0 and seed_diversity(varied, 2) > 0.1
    assert ratio(seed_diversity(collapsed, 2), seed_diversity(varied, 2)) < 0.05


def test_few_step_gap():
    x = _imgs()
    assert few_step_gap(x, x) == 0 and few_step_gap(x, _imgs(1)) > 0.2
