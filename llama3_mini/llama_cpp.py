"""Run a GGUF file in real llama.cpp, through the prebuilt library in the `cyllama` wheel
(0.2.18: Linux x86-64, Python 3.11; `make setup` installs it there).

    llama = LlamaCpp("story-q4_0.gguf")
    llama.logits(ids)            # (len(ids), vocab) float32, every position
    llama.greedy(ids, 20)        # argmax tokens through llama.cpp's own KV cache
    llama.chat("Who is the hero?")  # the file's chat template, rendered by llama.cpp

llama.cpp computes as it serves: its KV cache in f16, an f16 matrix times activations rounded
to f16, a q8_0/q5_0/q4_0 matrix times activations rounded to q8_0 blocks. So its logits are
close to, not equal to, ours at the same weights (tests/test_llama_cpp.py states the bounds)."""
from __future__ import annotations

from pathlib import Path

INSTALL_HINT = ("pip install cyllama==0.2.18 (a wheel with llama.cpp inside, for Linux x86-64 "
                "and Python 3.11; `make setup` installs it where it exists)")


def _cpp():
    try:
        import cyllama.llama.llama_cpp as cpp
    except ImportError as e:
        raise ImportError(f"running llama.cpp needs cyllama ({e}): {INSTALL_HINT}") from None
    cpp.disable_logging()
    return cpp


class LlamaCpp:
    """A GGUF file opened in llama.cpp: one sequence, n_ctx positions, `threads` threads."""

    def __init__(self, path, n_ctx: int = 512, threads: int = 1):
        cpp = _cpp()

        class Model(cpp.LlamaModel):
            # cyllama 0.2.18's LlamaContext.get_logits asks its model for n_vocab, which its
            # LlamaModel lacks; the vocabulary knows it.
            @property
            def n_vocab(self):
                return self.get_vocab().n_vocab

        if not Path(path).is_file():
            raise FileNotFoundError(f"no GGUF file {path}: write one with export_gguf")
        self._cpp = cpp
        self.model = Model(str(path), cpp.LlamaModelParams())
        params = cpp.LlamaContextParams()
        params.n_ctx = params.n_batch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        self.ctx = cpp.LlamaContext(self.model, params)
        self.vocab = self.model.get_vocab()
        self.n_ctx = n_ctx

    def _decode(self, ids, start: int, all_logits: bool) -> None:
        if start + len(ids) > self.n_ctx:
            raise ValueError(f"{start + len(ids)} positions do not fit n_ctx={self.n_ctx}: "
                             "open the file with a larger n_ctx")
        batch = self._cpp.LlamaBatch(n_tokens=len(ids), embd=0, n_seq_max=1)
        for i, t in enumerate(ids):
            batch.add(int(t), start + i, [0], all_logits or i == len(ids) - 1)
        if self.ctx.decode(batch) != 0:
            raise RuntimeError("llama.cpp could not decode this batch")

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        """llama.cpp's own tokenizer (special tokens in the text are parsed as such)."""
        return list(self.vocab.tokenize(text, bos, True))

    def logits(self, ids):
        """The logits at every position of ids, a fresh sequence: (len(ids), vocab)."""
        import torch

        self.ctx.kv_cache_clear()
        self._decode(ids, 0, True)
        return torch.tensor([self.ctx.get_logits_ith(i) for i in range(len(ids))])

    def greedy(self, ids, n: int) -> list[int]:
        """Up to n tokens after ids, each the argmax, one at a time through llama.cpp's KV
        cache; stops before an end-of-generation token (<|eot_id|>, <|end_of_text|>)."""
        self.ctx.kv_cache_clear()
        self._decode(ids, 0, False)
        out = []
        for _ in range(n):
            row = self.ctx.get_logits_ith(-1)
            t = max(range(len(row)), key=row.__getitem__)
            if self.vocab.is_eog(t):
                break
            out.append(t)
            self._decode([t], len(ids) + len(out) - 1, True)
        return out

    def chat(self, content: str, max_new_tokens: int = 20) -> str:
        """A one-turn chat: the file's chat template rendered by llama.cpp's template code
        (it recognises Llama 3's), <|begin_of_text|> added as the file asks, a greedy reply."""
        template = self.model.get_default_chat_template()
        message = self._cpp.LlamaChatMessage(role="user", content=content)
        prompt = self.model.chat_apply_template(template, [message], True)
        reply = self.greedy(self.tokenize(prompt), max_new_tokens)
        return self.vocab.detokenize(reply, False, False).strip()
