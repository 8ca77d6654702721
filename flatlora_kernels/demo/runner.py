"""The demo's worker processes (a module of their own: spawned workers cannot unpickle functions
defined in ``__main__``). Each builds its task itself (deterministic) and gets the pretrained weights.

A job is ``(method, seed, config, search)``; a ``search`` job (the validation search) runs on the
task without its test split, so a choice cannot see the test set even by mistake.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time

import torch

from . import data

_WORKER = {}


def init_worker(task_name, payload, threads):
    torch.set_num_threads(threads)
    _WORKER["name"] = task_name
    if task_name == "digits":
        from .digits_mlp import DigitsMLP

        state_dict, train_images = payload
        _WORKER["task"] = data.make_digits_task(target_train_size=train_images)
        model = DigitsMLP()
        model.load_state_dict(state_dict)
        _WORKER["base"] = model.eval()
    elif task_name == "lm":
        _quiet_optional_backends()
        from .lm_task import make_lm_task, tiny_gpt

        state_dict, settings = payload
        _WORKER["task"] = make_lm_task(settings)
        model = tiny_gpt(settings)
        model.load_state_dict(state_dict)
        _WORKER["base"] = model.eval()
    else:
        raise ValueError(f"unknown task {task_name!r}")


def _quiet_optional_backends():
    """The lm task runs on CPU without DeepSpeed or 4-bit layers, but the Trainer and PEFT import both
    when installed, and each logs a warning about a backend the demo never uses (DeepSpeed's
    accelerator detection, bitsandbytes' optional CPU kernel hub): named off here, in the demo's
    workers only."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)


def run_indexed(item):
    index, (method, seed, config, search) = item
    task = _WORKER["task"].without_test() if search else _WORKER["task"]
    if _WORKER["name"] == "digits":
        from .finetune import finetune

        return index, finetune(_WORKER["base"], task, method, seed=seed, config=config, device=torch.device("cpu"))
    from .lm_finetune import finetune_lm

    return index, finetune_lm(_WORKER["base"], task, method, seed=seed, config=config)


class Workers:
    """One pool for a whole job (spawned once: worker start-up is seconds on a busy machine); ``run``
    runs jobs in it (``threads`` torch threads each) and returns results in job order."""

    def __init__(self, *, task_name, payload, workers, threads, progress=True):
        self.workers, self.progress = workers, progress
        self._stack = contextlib.ExitStack()
        if workers == 1:  # in this process: no worker start-up (tests, debugging)
            init_worker(task_name, payload, threads)
            self._pool = None
        else:
            context = multiprocessing.get_context("spawn")  # fork after torch's thread pools can hang
            self._pool = self._stack.enter_context(context.Pool(workers, init_worker, (task_name, payload, threads)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def run(self, jobs, label):
        started = time.perf_counter()
        results = [None] * len(jobs)
        bar = None
        if sys.stdout.isatty() and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=label, unit="run", file=sys.stdout)
        items = list(enumerate(jobs))
        finished = map(run_indexed, items) if self._pool is None else self._pool.imap_unordered(run_indexed, items)
        for done, (index, result) in enumerate(finished, 1):
            results[index] = result
            if bar is not None:
                bar.update(1)
            elif self.progress and (done % max(1, len(jobs) // 5) == 0 or done == len(jobs)):
                print(f"  {label}: {done}/{len(jobs)} runs, {time.perf_counter() - started:.0f} s", flush=True)  # piped: a few plain lines
        if bar is not None:
            bar.close()
        return results
