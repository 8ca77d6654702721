"""The shared number checks of flatlora_kernels/_validation.py, directly and through the entry points."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatlora_kernels import EFMLoRA, FlatLoraLinear, FlatLoraSchedule, RhoSchedule
from flatlora_kernels._validation import check_integer, check_real, scalar_tensor


def test_check_integer():
    assert check_integer("r", np.int64(3), minimum=1) == 3 and type(check_integer("r", 3, minimum=1)) is int
    assert check_integer("total_steps", None, minimum=1, optional=True) is None
    for bad, minimum, message in [
        (0, 1, "r must be a positive integer, got 0"),
        (-1, 0, "r must be a non-negative integer, got -1"),
        (1, 2, "r must be an integer >= 2, got 1"),
        (True, 0, "r must be a non-negative integer, got True"),
        (2.0, 1, "r must be a positive integer, got 2.0"),
        (None, 1, "r must be a positive integer, got None"),
    ]:
        with pytest.raises(ValueError) as caught:
            check_integer("r", bad, minimum=minimum)
        assert str(caught.value) == message


def test_check_real():
    assert check_real("beta", np.float32(0.5), low=0, high=1, low_open=True) == 0.5
    assert check_real("pinv_rtol", None, low=0, optional=True) is None
    assert check_real("scaling", -3) == -3.0
    for bad, bounds, message in [
        (0.0, dict(low=0, high=1, low_open=True), "beta must be a finite number in (0, 1], got 0.0"),
        (1.0, dict(low=0, high=1, high_open=True), "beta must be a finite number in [0, 1), got 1.0"),
        (-0.1, dict(low=0), "beta must be a finite number >= 0, got -0.1"),
        (0, dict(low=0, low_open=True), "beta must be a finite number > 0, got 0"),
        (2, dict(high=1, high_open=True), "beta must be a finite number < 1, got 2"),
        (math.nan, {}, "beta must be a finite number, got nan"),
        (math.inf, dict(low=0), "beta must be a finite number >= 0, got inf"),
        (False, {}, "beta must be a finite number, got False"),
        ("0.5", {}, "beta must be a finite number, got '0.5'"),
        (2.0, dict(low=0, high=1, optional=True), "beta must be a finite number in [0, 1] (or None), got 2.0"),
    ]:
        with pytest.raises(ValueError) as caught:
            check_real("beta", bad, **bounds)
        assert str(caught.value) == message


def test_scalar_tensor_detaches_and_converts():
    sigma = torch.tensor([0.25], dtype=torch.float64, requires_grad=True)
    t = scalar_tensor(sigma, torch.float32, torch.device("cpu"))
    assert t.shape == () and t.dtype == torch.float32 and not t.requires_grad and t.item() == 0.25
    seed = scalar_tensor(2**62 + 1, torch.int64, torch.device("cpu"))
    assert seed.shape == () and seed.dtype == torch.int64 and seed.item() == 2**62 + 1


def _lora_model():
    return nn.Sequential(FlatLoraLinear(4, 4, r=2, sigma=0.1))


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: FlatLoraLinear(4, 4, r=True), "r"),
        (lambda: FlatLoraLinear(4, 4, lora_alpha=True), "lora_alpha"),
        (lambda: FlatLoraLinear(4, 4, sigma=True), "sigma"),
        (lambda: FlatLoraLinear(True, 4), "in_features"),
        (lambda: FlatLoraSchedule(_lora_model(), total_steps=True), "total_steps"),
        (lambda: FlatLoraSchedule(_lora_model(), total_steps=4, rank=True), "rank"),
        (lambda: RhoSchedule(True), "rho"),
        (lambda: RhoSchedule(0.1, "cosine", total_steps=True), "total_steps"),
        (lambda: EFMLoRA(m := _lora_model(), torch.optim.SGD(m.parameters(), lr=0.1), beta=True), "beta"),
        (lambda: EFMLoRA(m := _lora_model(), torch.optim.SGD(m.parameters(), lr=0.1), pinv_rtol=False), "pinv_rtol"),
    ],
)
def test_entry_points_reject_bools_by_name(build, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        build()


def test_entry_points_accept_numpy_numbers():
    layer = FlatLoraLinear(np.int64(4), 4, r=np.int32(2), lora_alpha=np.float32(4.0), sigma=np.float64(0.1))
    assert layer.r == 2 and layer.scaling == 2.0
    schedule = FlatLoraSchedule(nn.Sequential(layer), total_steps=np.int64(10), seed=np.uint32(3))
    assert schedule.total_steps == 10 and schedule.seed == 3
