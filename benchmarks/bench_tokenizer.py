"""Tokenizer benchmark: BPE trainers and encoders side by side, in seconds and ratios.

    python benchmarks/bench_tokenizer.py [--mb 1.0] [--teaching-merges 6] [--teaching-full]

Text: the standard library's source and the Python docs' topics (English), about half each,
found on every machine. Trainers: the teaching one (recounts every pair on every merge), the fast
one (incremental counts, a heap) and Hugging Face `tokenizers`' BpeTrainer (Rust, with
Llama 3's split pattern and byte-level alphabet). Encoders: our pure-Python one, our
tiktoken export and Hugging Face `tokenizers`.

The teaching trainer would take an hour or more on 1 MB, so by default it runs only its first
merges and its total is extrapolated, as a range: its cost per merge is about proportional
to the tokens left in the text, which fall from N0 (the bytes) to N1 (after training), so the
total lies between (first merges' seconds per merge) x merges x N1/N0 and the same without
the N1/N0 factor. --teaching-full times it for real. (Checked once on 0.1 MB at 1,024: the
range said 60 to 175 s, the full run took 159 s and gave the fast trainer's merges.)"""
import argparse
import os
import time

from llama3_mini import tokenizer as T
from llama3_mini.data import sample_text

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def hf_tokenizer(vocab_size):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(T.SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def teaching_first_merges(text, n_merges):
    """Seconds for the teaching trainer's first n_merges merges (the same for any size)."""
    _, seconds = timed(T.train_teaching, text, 256 + n_merges)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="megabytes of text (default 1)")
    parser.add_argument("--teaching-merges", type=int, default=6,
                        help="merges the teaching trainer runs before extrapolating")
    parser.add_argument("--teaching-full", action="store_true",
                        help="run the teaching trainer to the end (an hour or more per size)")
    args = parser.parse_args()
    prose = sample_text("prose", int(args.mb * 1e6 / 2))  # all of it is ~465 KB
    text = sample_text("code", int(args.mb * 1e6) - len(prose.encode("utf-8"))) + prose
    n_bytes = len(text.encode("utf-8"))
    print(f"# Tokenizer benchmark: {n_bytes:,} bytes (stdlib code + Python docs prose), "
          f"{os.cpu_count()} CPU cores; HF tokenizers may use them all, ours use one\n")

    k = args.teaching_merges
    t_first = None if args.teaching_full else teaching_first_merges(text, k)
    rows, tokenizers = [], {}
    for vocab_size in (1024, 4096):
        ranks, t_fast = timed(T.train_fast, text, vocab_size, progress=False)
        tok = tokenizers[vocab_size] = T.Tokenizer(ranks)
        hf, trainer = hf_tokenizer(vocab_size)
        _, t_hf = timed(hf.train_from_iterator, [text], trainer)
        merges = vocab_size - 256
        if args.teaching_full:
            slow, t_teach = timed(T.train_teaching, text, vocab_size)
            assert slow == ranks, "the teaching and fast trainers disagree"
            low = high = t_teach
        else:
            n1 = len(tok.encode(text))
            high = t_first / k * merges
            low = high * n1 / n_bytes
        rows.append((vocab_size, low, high, t_fast, t_hf, hf))

    how = "measured" if args.teaching_full else f"extrapolated from its first {k} merges"
    print(f"## Training (seconds; teaching trainer {how})\n")
    print("| vocab | teaching | fast | HF tokenizers | teaching / fast | fast / HF |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for vocab_size, low, high, t_fast, t_hf, _ in rows:
        teach = f"{low:,.0f}" if low == high else f"{low:,.0f} to {high:,.0f}"
        ratio = (f"{low / t_fast:,.0f}x" if low == high
                 else f"{low / t_fast:,.0f}x to {high / t_fast:,.0f}x")
        print(f"| {vocab_size:,} | {teach} | {t_fast:.2f} | {t_hf:.2f} | {ratio} | "
              f"{t_fast / t_hf:.1f}x |")
    _, low, _, t_fast, t_hf, hf4096 = rows[-1]
    print(f"\nTargets at 4,096: fast >= 50x faster than teaching: "
          f"{'met' if low / t_fast >= 50 else 'NOT met'} (at least {low / t_fast:,.0f}x); "
          f"within 10x of HF tokenizers: {'met' if t_fast / t_hf <= 10 else 'NOT met'} "
          f"({t_fast / t_hf:.1f}x)\n")

    tok = tokenizers[4096]
    tok.encode("warm up")  # builds the tiktoken.Encoding
    ids_py, t_py = timed(tok.encode, text, pure_python=True)
    ids_tk, t_tk = timed(tok.encode, text)
    assert ids_py == ids_tk, "the pure-Python and tiktoken encoders disagree"
    _, t_raw = timed(tok.tiktoken_encoding.encode_ordinary, text)
    hf_out, t_hf_enc = timed(hf4096.encode, text)
    lines = text.splitlines(keepends=True)
    hf_batch, t_hf_batch = timed(hf4096.encode_batch, lines)
    print("## Encoding the same text at vocab 4,096 (throughput)\n")
    print("| encoder | MB/s | vs pure Python | tokens |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds, n in [("ours, pure Python", t_py, len(ids_py)),
                             ("ours, tiktoken export (with Meta's slicing)", t_tk, len(ids_tk)),
                             ("tiktoken alone (encode_ordinary)", t_raw, len(ids_tk)),
                             ("HF tokenizers, one string (its own 4,096 merges)", t_hf_enc,
                              len(hf_out.ids)),
                             ("HF tokenizers, encode_batch of the lines (parallel)", t_hf_batch,
                              sum(len(e.ids) for e in hf_batch))]:
        print(f"| {name} | {n_bytes / 1e6 / seconds:.2f} | {t_py / seconds:.1f}x | {n:,} |")

    print("\n## Very long inputs (no piece is ever longer than 25,000 characters)\n")
    print("| input | encoder | 1x: seconds | 2x: seconds | ratio (2 = linear) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, char in (("a run of spaces", " "), ("a line without spaces", "x")):
        for encoder, size, pure in (("tiktoken", 1_000_000, False),
                                    ("pure Python", 100_000, True)):
            _, t1 = timed(tok.encode, char * size, pure_python=pure)
            _, t2 = timed(tok.encode, char * (2 * size), pure_python=pure)
            print(f"| {name}, {size / 1e6:g} MB | {encoder} | {t1:.2f} | {t2:.2f} | "
                  f"{t2 / t1:.1f} |")


if __name__ == "__main__":
    main()
