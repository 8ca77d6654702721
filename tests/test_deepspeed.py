"""DeepSpeed ZeRO-2 and ZeRO-3 under the Trainer, 2 CPU ranks over gloo, a PeftModel patched by
enable_flat_lora: trains with the noise on, evaluates and saves as PEFT does, and the adapter equals a
single-process run of the same global batches (to rounding) and loads in plain PEFT.

All ranks draw the same eps (``per_rank_seeds=False``), so the averaged gradient is the gradient of
the whole global batch under one draw: what one process computes with the global batch."""

import importlib
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from flatlora_kernels import FlatLoraSchedule  # noqa: E402
from flatlora_kernels.hf import FlatLoraCallback  # noqa: E402
from flatlora_kernels.peft import enable_flat_lora, patched_layers  # noqa: E402

from ._dist_utils import spawn  # noqa: E402
from .test_hf_peft_native import tiny_llama  # noqa: E402

STEPS, PER_RANK, WORLD = 3, 2, 2
SIGMA = 0.5
DATA = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 8), generator=torch.Generator().manual_seed(0))]


def _peft_model(sigma):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    enable_flat_lora(model, sigma=sigma)
    return model


def _record_gathering(model, seen):
    """On the first training forward of the first patched layer: the ZeRO-3 status of its base weight and
    of the last patched layer's (read through named_parameters: a module attribute access would make
    DeepSpeed gather the parameter)."""
    names = [f"{name}.base_layer.weight" for name, _ in patched_layers(model)]

    def hook(module, args, output):
        if not seen and module.training:
            params = dict(model.named_parameters())
            seen.append(tuple(getattr(getattr(params[n], "ds_status", None), "name", None) for n in (names[0], names[-1])))

    patched_layers(model)[0][1].register_forward_hook(hook)  # a hook on the patched layer itself runs


def _train(output_dir, batch, sigma, deepspeed=None, seen=None):
    """Trainer run: the adapter saved to ``output_dir/adapter``, the eval loss to ``output_dir/eval.json``."""
    model = _peft_model(sigma)
    if seen is not None:
        _record_gathering(model, seen)
    schedule = FlatLoraSchedule(model, total_steps=None, seed=7, per_rank_seeds=False)
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        learning_rate=5e-2, max_grad_norm=0.0, lr_scheduler_type="constant", train_sampling_strategy="sequential",
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, deepspeed=deepspeed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DATA, eval_dataset=DATA[:4],
                                   callbacks=[FlatLoraCallback(schedule)])  # fmt: skip
    trainer.train()
    if deepspeed is not None:  # the run really went through DeepSpeed at that stage, over both ranks
        engine = trainer.model_wrapped
        assert type(engine).__name__ == "DeepSpeedEngine" and trainer.accelerator.num_processes == WORLD
        assert engine.zero_optimization_stage() == deepspeed["zero_optimization"]["stage"]
    assert schedule.step_count == STEPS and schedule.factor > 0
    assert all(float(layer.noise_factor) > 0 for layer in schedule.layers)  # the noise is on, on every layer
    loss = trainer.evaluate()["eval_loss"]
    trainer.save_model(os.path.join(output_dir, "adapter"))
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "eval.json"), "w") as handle:
            json.dump({"eval_loss": loss}, handle)


def _zero_worker(rank, world_size, stage, output_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (minutes); gloo does here.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    config = {
        "train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        # Threshold 0: even this tiny model's parameters are partitioned (none kept whole as "persistent");
        # reuse distance and prefetch 0: a parameter is gathered only while its layer runs (checked below).
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True,
                              "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                              "stage3_prefetch_bucket_size": 0},
    }
    seen = []
    _train(output_dir, PER_RANK, SIGMA, deepspeed=config, seen=seen)
    # ZeRO-3 gathers the one layer that runs (its own hook, no copy of the model); ZeRO-2 does not partition.
    assert seen[0] == (("AVAILABLE", "NOT_AVAILABLE") if stage == 3 else (None, None)), seen


def _adapter(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter", "adapter_model.safetensors"))


def _logits_of_saved(directory):
    model = peft.PeftModel.from_pretrained(tiny_llama(), os.path.join(directory, "adapter")).eval()
    with torch.no_grad():
        return model(DATA[0]["input_ids"][None]).logits


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("single"))
    _train(root, PER_RANK * WORLD, SIGMA)
    return root


@pytest.fixture(scope="module")
def single_process_without_noise(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("single_sigma0"))
    _train(root, PER_RANK * WORLD, 0.0)
    return root


def test_the_noise_changes_the_adapter(single_process, single_process_without_noise):
    """So the runs below, equal to the noisy single-process run, trained with the noise on."""
    noisy, plain = _adapter(single_process), _adapter(single_process_without_noise)
    assert max((noisy[k] - plain[k]).abs().max().item() for k in noisy) > 1e-2


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_with_noise_like_one_process_and_saves_a_peft_adapter(stage, single_process, tmp_path):
    spawn(_zero_worker, WORLD, args=(stage, str(tmp_path)), deadline_s=120)
    ours, reference = _adapter(str(tmp_path)), _adapter(single_process)
    assert ours.keys() == reference.keys() and len(ours) == 6
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    with open(os.path.join(tmp_path, "eval.json")) as a, open(os.path.join(single_process, "eval.json")) as b:
        assert json.load(a)["eval_loss"] == pytest.approx(json.load(b)["eval_loss"], rel=1e-5)
    torch.testing.assert_close(_logits_of_saved(str(tmp_path)), _logits_of_saved(single_process), rtol=1e-4, atol=1e-5)
