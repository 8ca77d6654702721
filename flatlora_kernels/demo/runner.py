"""The demo's worker processes (a module of their own: spawned workers cannot unpickle functions
defined in ``__main__``). Each builds the task itself (deterministic) and gets the pretrained weights."""

from __future__ import annotations

import torch

from .data import make_digits_task
from .finetune import finetune
from .digits_mlp import DigitsMLP

_WORKER = {}


def init_worker(state_dict, train_images, threads):
    torch.set_num_threads(threads)
    _WORKER["task"] = make_digits_task(target_train_size=train_images)
    model = DigitsMLP()
    model.load_state_dict(state_dict)
    _WORKER["base"] = model.eval()


def run_indexed(item):
    index, (method, seed, config) = item
    return index, finetune(_WORKER["base"], _WORKER["task"], method, seed=seed, config=config, device=torch.device("cpu"))
