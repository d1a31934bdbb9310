"""Checkers for the course's exercises, in course order: each runs a learner's function
against the package's reference on many cases, edge cases included, and says either that it
is right or which input gave which wrong output, what was expected, where they differ and
which likely mistake it is (`checking.run_checks`). A wrong answer shows no traceback into the
package; an exception raised by the learner's own code propagates, to their line.

`building` holds chapters 00, 01 and 05, `layers` 02 to 04, `training` 06 to 10 (and
`synthetic_data` chapter 10's); a notebook
imports from here: `from llama3_mini.exercises import check_merge`."""
from .attention_kernel import check_online_softmax_step
from .building import (
    check_count_pairs,
    check_count_params,
    check_count_params_qkv_bias,
    check_dialog_prompt,
    check_merge,
    check_top_p,
    count_params_with_qkv_bias,
)
from .checking import first_difference, run_checks, same
from .document_mask import check_document_mask
from .layers import (
    check_ffn_hidden_dim,
    check_ffn_params,
    check_fused_swiglu,
    check_gqa_attention,
    check_mean_pool_kv,
    check_rope_rotate,
    check_rope_scores,
    ffn_params,
)
from .parallel import check_cp_chunks
from .posttraining import check_llama3_dpo_loss
from .quantization import check_q4_0_block
from .scaling import check_isoflop_optimum
from .synthetic_data import check_next_names
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
    "check_rope_scores", "check_gqa_attention", "check_mean_pool_kv", "check_ffn_hidden_dim",
    "ffn_params",
    "check_ffn_params", "check_fused_swiglu", "check_top_p", "run_checks", "same",
    "first_difference", "check_lr_schedule", "check_text_bits_per_byte",
    "check_loss_mask", "check_lora_params", "check_rope_scaling", "check_stretch_context",
    "check_merge_shards", "check_name_entropy", "check_llama3_dpo_loss", "check_isoflop_optimum",
    "check_cp_chunks", "check_q4_0_block", "check_online_softmax_step", "check_next_names",
    "check_document_mask",
]
