"""Llama 3's 4D parallelism on torch's own engines ("The Llama 3 Herd of Models", section
3.3.2): one module per dimension. spawn.py starts ranks from one process (tests, notebook
11a); fsdp.py shards parameters (FSDP2); tensor.py splits each layer Megatron's way through
DTensor; pipeline.py cuts the blocks into stages; context.py splits the sequence; mesh.py
groups ranks in the paper's order [TP, CP, PP, DP] and composes them."""
