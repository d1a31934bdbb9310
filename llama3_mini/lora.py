"""Low-rank adapters (LoRA, Hu et al. 2021) for fine-tuning.

A frozen linear layer W (out, in) gets a trainable update of rank r:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T,   A: (r, in), B: (out, r)

B starts at zero, so the adapted model starts as the base model exactly. Only A and B
train: r * (in + out) numbers instead of in * out. After training, B A can be added into W
("merged"): the model is then as fast as the base, and `unmerge` takes it out again."""
from __future__ import annotations

import math

import torch
from torch import nn

# The linear layers a Llama block has, by Meta's names.
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank ({rank}) must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout ({dropout}) must be in [0, 1)")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scaling = alpha / rank
        base.weight.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self._original = None  # the base weight before merging, for an exact unmerge

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A: what merging adds to the base weight, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # (..., in) -> (..., rank) -> (..., out)
        return y + (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T * self.scaling

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Add the update into the base weight. keep_original keeps a copy of the weight so
        that `unmerge` restores it bit for bit (subtracting would leave rounding error)."""
        if self.merged:
            return
        self._original = self.base.weight.detach().clone() if keep_original else None
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again."""
        if not self.merged:
            return
        if self._original is not None:
            self.base.weight.copy_(self._original)
        else:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self._original, self.merged = None, False

    def extra_repr(self) -> str:
        out, inp = self.base.weight.shape
        return f"in={inp}, out={out}, rank={self.rank}, alpha={self.alpha}"


def lora_param_count(args, targets=("wq", "wv"), rank: int = 8) -> int:
    """What `add_lora(model, targets, rank)` trains, from the shapes alone (no model built):
    r * (in + out) per adapted projection, in every layer. For Llama 3 8B, rank 16 on wq and
    wv: 32 layers * 16 * ((4096 + 4096) + (4096 + 1024)) = 6,815,744."""
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if unknown or rank < 1:
        raise ValueError(f"targets among {', '.join(LINEAR_NAMES)} and rank >= 1, got "
                         f"{targets!r} and {rank}")
    q, kv, hidden = args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.hidden_dim
    shapes = {"wq": (args.dim, q), "wk": (args.dim, kv), "wv": (args.dim, kv),
              "wo": (q, args.dim), "w1": (args.dim, hidden), "w2": (hidden, args.dim),
              "w3": (args.dim, hidden)}  # (in, out) of each projection
    return args.n_layers * rank * sum(sum(shapes[t]) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, targets=("wq", "wv"), rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.0) -> nn.Module:
    """Freeze every weight of the model and put an adapter on each linear layer whose name
    is in targets (Meta's names: wq, wk, wv, wo, w1, w2, w3). Changes the model in place
    and returns it."""
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if unknown or not targets:
        raise ValueError(f"cannot put adapters on {unknown or targets!r}: choose among "
                         f"{', '.join(LINEAR_NAMES)}")
    if lora_layers(model):
        raise ValueError("the model already has adapters; call remove_lora(model) first")
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                adapter = LoRALinear(child, rank, alpha, dropout)
                setattr(parent, name, adapter.train(child.training))  # keep eval/train mode
                found += 1
    if not found:
        raise ValueError(f"no linear layer named {', '.join(targets)} in this model")
    return model


class TokenRows(nn.Module):
    """A frozen embedding (vocab, dim) or output layer (dim -> vocab) whose rows for a few
    token ids get a trainable change `lora_rows` (len(ids), dim), starting at zero: what
    adapters alone cannot reach when the fine-tuning data uses tokens the base model never
    learned (Hugging Face PEFT's Trainable Tokens does this for embeddings). The rest stays
    frozen.

    Output, ids [5, 9]: logits[..., 5] += h @ lora_rows[0], logits[..., 9] += h @ lora_rows[1].
    Embedding, ids [5, 9]: a token 9 reads weight[9] + lora_rows[1]; a token 3 reads weight[3]."""

    def __init__(self, base: nn.Module, ids):
        super().__init__()
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TypeError(f"TokenRows wraps nn.Embedding or nn.Linear, not {type(base).__name__}")
        vocab, dim = base.weight.shape  # both store (vocab, dim)
        ids = sorted(set(int(i) for i in ids))
        if not ids or ids[0] < 0 or ids[-1] >= vocab:
            raise ValueError(f"token ids must be a non-empty set in [0, {vocab}), got {ids}")
        self.base = base
        base.weight.requires_grad_(False)
        w = base.weight
        self.register_buffer("ids", torch.tensor(ids, device=w.device), persistent=False)
        # slot[t]: 1 + the row of token t in lora_rows, 0 for a token left frozen
        slot = torch.zeros(vocab, dtype=torch.long, device=w.device)
        slot[self.ids] = torch.arange(1, len(ids) + 1, device=w.device)
        self.register_buffer("slot", slot, persistent=False)
        self.lora_rows = nn.Parameter(torch.zeros(len(ids), dim, device=w.device, dtype=w.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The change to the full weight (vocab, dim): lora_rows on the chosen rows, else 0."""
        return torch.zeros_like(self.base.weight).index_copy(0, self.ids, self.lora_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Embedding):  # x: token ids (...,) -> (..., dim)
            rows = torch.cat([self.lora_rows.new_zeros(1, self.lora_rows.shape[1]),
                              self.lora_rows])  # row 0: no change
            return self.base(x) + rows[self.slot[x]]
        # x: hidden states (..., dim) -> logits (..., vocab), the chosen columns changed
        return self.base(x).index_add(-1, self.ids, x @ self.lora_rows.T)


def train_token_rows(model: nn.Module, ids, modules=("tok_embeddings", "output")) -> nn.Module:
    """Make the rows of `ids` trainable in the model's input embedding and/or output layer
    (Meta's names), the rest of both frozen; call after `add_lora`. With tied embeddings the
    two are one weight: only `output` may be named. Changes the model in place, returns it."""
    if getattr(getattr(model, "params", None), "tie_word_embeddings", False) and \
            "tok_embeddings" in modules:
        raise ValueError("the model ties its embeddings to its output: train the rows of "
                         "modules=('output',) only")
    for name in modules:
        child = getattr(model, name, None)
        if not isinstance(child, (nn.Embedding, nn.Linear)):
            raise ValueError(f"no embedding or output layer named {name!r}: use "
                             "'tok_embeddings' and/or 'output'")
        setattr(model, name, TokenRows(child, ids))
    return model


def merge_lora(model: nn.Module, keep_original: bool = True) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.merge(keep_original)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain linear layers back (with the update merged in when merge=True), so the
    model has its original parameter names again (to save it, or convert it). Trainable token
    rows (`train_token_rows`) are added into their weights either way. Every parameter becomes
    trainable again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                if merge:
                    child.merge(keep_original=False)
                elif child.merged:
                    child.unmerge()
                setattr(parent, name, child.base)
            elif isinstance(child, TokenRows):  # the changed rows go into the weight
                with torch.no_grad():
                    child.base.weight += child.delta_weight().to(child.base.weight.dtype)
                setattr(parent, name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone (and any trainable token rows): what a LoRA fine-tune needs to save
    (a few hundred KB here)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    return (f"trainable: {trainable:,} of {total:,} parameters "
            f"({100 * trainable / total:.2f}%)")
