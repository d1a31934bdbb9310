"""Checkers for the course's exercises, in course order: each runs a learner's function
against the package's reference on many cases, edge cases included, and says in a line or two
either that it is right or which input gave which wrong output and what was expected
(`checking.run_checks`). A wrong answer never shows a traceback; an exception raised by the
learner's own code propagates, so its traceback points at their line.

`building` holds chapters 00 to 05, `training` chapters 06 to 10; a notebook imports from
here: `from llama3_mini.exercises import check_merge`."""
from .building import (
    check_count_pairs,
    check_count_params,
    check_count_params_qkv_bias,
    check_dialog_prompt,
    check_ffn_hidden_dim,
    check_ffn_params,
    check_gqa_attention,
    check_merge,
    check_rope_rotate,
    check_top_p,
    count_params_with_qkv_bias,
    ffn_params,
)
from .checking import run_checks, same
from .training import (
    check_lora_params,
    check_loss_mask,
    check_lr_schedule,
    check_merge_shards,
    check_name_entropy,
    check_rope_scaling,
    check_stretch_context,
    check_text_bits_per_byte,
)

__all__ = [
    "check_count_params", "count_params_with_qkv_bias", "check_count_params_qkv_bias",
    "check_merge", "check_count_pairs", "check_dialog_prompt", "check_rope_rotate",
    "check_gqa_attention", "check_ffn_hidden_dim", "ffn_params", "check_ffn_params",
    "check_top_p", "run_checks", "same", "check_lr_schedule", "check_text_bits_per_byte",
    "check_loss_mask", "check_lora_params", "check_rope_scaling", "check_stretch_context",
    "check_merge_shards", "check_name_entropy",
]
