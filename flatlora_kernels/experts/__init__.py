"""Flat-LoRA on mixture-of-experts expert stacks: PEFT ``LoraConfig(target_parameters=[...])`` LoRA.

``layout`` (which axes of a 3-D expert parameter are out and in), ``stack_noise`` (a stack's eps,
added in place chunk by chunk), ``support`` (which ``ParamWrapper`` layers can run, their refusals;
no peft import) and ``peft_wrapper`` (``FlatLoraParamWrapper``, what ``enable_flat_lora`` switches a
``ParamWrapper`` to; imports peft, loaded on first use). The noise is defined in
``flatlora_kernels.noise`` ("Expert stacks").
"""

from .layout import ExpertLayout, expert_layout
from .stack_noise import add_stack_noise_
from .support import is_param_wrapper, param_wrapper_problem

__all__ = ["ExpertLayout", "expert_layout", "add_stack_noise_", "is_param_wrapper", "param_wrapper_problem"]
