"""Llama 3's document mask ("The Llama 3 Herd of Models", section 3.2): documents packed into
one window do not attend to each other. Checked against each document run alone, against
Hugging Face transformers' own packed-sequence attention (an independent reference), and
through packing, batches and the trainer."""
import numpy as np
import pytest
import torch
from model_support import one_thread, random_model  # noqa: F401  (one thread per test)

from llama3_mini.checkpoint import args_from_hf_config, from_hf_state_dict
from llama3_mini.config import ModelArgs
from llama3_mini.data import batch_at, document_starts, pack_documents, prepare_data
from llama3_mini.generate import generate
from llama3_mini.kv_cache import make_cache
from llama3_mini.model import Transformer, document_mask
from llama3_mini.train import TrainConfig, Trainer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32,
                 max_seq_len=64)
LENGTHS = [[7, 12, 5], [3, 21]]  # two windows of 24 tokens, three and two documents
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def packed(lengths=LENGTHS, seed=0):
    """Random tokens (rows, 24) and their document ids, one row per list of lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 97, (len(lengths), sum(lengths[0])), generator=g)
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                       for row in lengths])
    return tokens, ids


def test_mask_entries_are_causal_within_documents_and_closed_across():
    torch.manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 3, (2, 9)).sort(-1).values
        mask = document_mask(ids)
        assert mask.shape == (2, 1, 9, 9)
        for b, i, j in np.ndindex(2, 9, 9):
            open_ = j <= i and ids[b, i] == ids[b, j]
            assert mask[b, 0, i, j].item() == (0.0 if open_ else float("-inf")), (b, i, j)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_packed_logits_equal_each_document_run_alone(device, fused):
    """Positions run on across documents, yet each document's logits are those it has alone
    from position 0: RoPE's scores depend on offsets only."""
    model = random_model(ARGS).to(device).set_fast_attention(fused)
    tokens, ids = packed()
    with torch.no_grad():
        logits = model(tokens.to(device), doc_ids=ids.to(device))
        unmasked = model(tokens.to(device))
        for row, lengths in enumerate(LENGTHS):
            start = 0
            for n in lengths:
                alone = model(tokens[row:row + 1, start:start + n].to(device))[0]
                torch.testing.assert_close(logits[row, start:start + n], alone,
                                           atol=2e-5, rtol=1e-5)
                start += n
    # and the mask matters: without it, later documents see the earlier ones
    assert (logits[0, 7:] - unmasked[0, 7:]).abs().max() > 1e-2
    torch.testing.assert_close(logits[0, :7], unmasked[0, :7])


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_path_equals_fused_path_under_the_mask(device):
    model = random_model(ARGS).to(device)
    tokens, ids = packed(seed=1)
    with torch.no_grad():
        fused = model.set_fast_attention(True)(tokens.to(device), doc_ids=ids.to(device))
        explicit = model.set_fast_attention(False)(tokens.to(device), doc_ids=ids.to(device))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_one_document_changes_nothing(fused):
    model = random_model(ARGS).set_fast_attention(fused)
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, doc_ids=torch.zeros_like(tokens)),
                                   model(tokens), atol=1e-6, rtol=0)


def test_generation_with_the_cache_is_unchanged():
    """The last document of a packed window, decoded token by token through the KV cache
    alone, gives the masked window's logits; generate() is untouched by the mask."""
    model = random_model(ARGS)
    tokens, ids = packed()
    last = tokens[0, 19:]  # the third document, 5 tokens
    with torch.no_grad():
        window = model(tokens, doc_ids=ids)[0, 19:]
        cache = make_cache(model, max_seq_len=16)
        steps = [model(last[None, :2], 0, cache)[0]]
        steps += [model(last[None, p:p + 1], p, cache)[0] for p in range(2, 5)]
        torch.testing.assert_close(torch.cat(steps), window, atol=2e-5, rtol=1e-5)
        out = generate(model, [last.tolist()], max_new_tokens=6)
        seq = last.tolist()
        for _ in range(6):  # greedy by full forward passes of the document alone
            one_doc = torch.zeros(1, len(seq), dtype=torch.long)
            seq.append(int(model(torch.tensor([seq]), doc_ids=one_doc)[0, -1].argmax()))
    assert out[0][-6:] == seq[-6:]


def test_doc_ids_refuse_a_cache_or_wrong_shape():
    model = random_model(ARGS)
    tokens, ids = packed()
    with pytest.raises(ValueError, match="no cache and start_pos 0"):
        model(tokens, cache=make_cache(model, batch_size=2), doc_ids=ids)
    with pytest.raises(ValueError, match="one document id per token"):
        model(tokens, doc_ids=ids[:, 1:])


# Hugging Face transformers as the reference: its LlamaForCausalLM keeps packed sequences
# apart when position_ids restart at each document (masking_utils.find_packed_sequence_indices),
# and takes a 4D boolean mask as given.
transformers = pytest.importorskip("transformers")


def hf_pair(case):
    from test_parity import CASES, random_hf_model
    hf = random_hf_model(*CASES[case])
    args = args_from_hf_config(hf.config)
    ours = Transformer(args).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), args))
    return hf, ours


@pytest.mark.parametrize("case", ["gqa-2", "gqa-scaled"])
def test_masked_logits_equal_hugging_face_with_restarting_positions(case):
    hf, ours = hf_pair(case)
    tokens, ids = packed()
    restart = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    with torch.no_grad():
        expected = hf(tokens, position_ids=restart, use_cache=False).logits
        assert (expected - hf(tokens).logits).abs().max() > 1e-2  # HF did pack them apart
        torch.testing.assert_close(ours(tokens, doc_ids=ids), expected, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ours.set_fast_attention(False)(tokens, doc_ids=ids),
                                   expected, atol=2e-5, rtol=1e-5)


def test_masked_logits_equal_hugging_face_given_the_4d_mask():
    hf, ours = hf_pair("mqa")
    tokens, ids = packed(seed=2)
    n = tokens.shape[1]
    allowed = (ids[:, :, None] == ids[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = hf(tokens, attention_mask=allowed[:, None]).logits  # positions run on
        torch.testing.assert_close(ours(tokens, doc_ids=ids), expected, atol=1e-5, rtol=1e-5)


# Packing: where each document starts, kept beside the stream.
def test_batch_ids_follow_the_document_starts():
    rng = np.random.default_rng(0)
    docs = [np.full(n, d, dtype=np.int64) for d, n in enumerate(rng.integers(1, 30, 50))]
    stream, starts = np.concatenate(docs), document_starts(docs)
    for step in range(10):
        x, y, ids = batch_at(stream, step, batch_size=4, seq_len=40, doc_starts=starts)
        assert ids.shape == x.shape and ids.dtype == torch.long
        # each token's value is its document's index here: ids are those, counted from 0
        torch.testing.assert_close(ids, x - x[:, :1], rtol=0, atol=0)
        x2, y2 = batch_at(stream, step, batch_size=4, seq_len=40)
        assert torch.equal(x, x2) and torch.equal(y, y2)  # the same windows with or without


def test_packed_validation_rows_name_each_document():
    docs = [np.arange(n) + 100 * d for d, n in enumerate([5, 9, 3, 30, 4])]
    rows, ids = pack_documents(docs, 12, doc_ids=True)
    assert torch.equal(rows, pack_documents(docs, 12))
    assert torch.equal(ids < 0, rows == -100)
    for d, doc in enumerate(docs):  # a document's tokens are where its id is (pieces overlap by 1)
        got = rows[ids == d].tolist()
        assert set(got) == set(doc.tolist()) and got[0] == doc[0] and got[-1] == doc[-1]


class Chars:
    """A byte tokenizer with <|begin_of_text|> 256 and <|end_of_text|> 257."""
    n_words, special_tokens = 258, {"<|begin_of_text|>": 256, "<|end_of_text|>": 257}

    def encode(self, s, bos=False, eos=False):
        return [256] * bos + list(s.encode()) + [257] * eos

    def decode_bytes(self, ids):
        return bytes(ids)


def test_every_document_starts_at_a_begin_of_text():
    """The stored starts agree with the tokens themselves: a new id exactly at each
    <|begin_of_text|> that encode_documents put before every document."""
    texts = [f"story {i} " * (i % 7 + 1) for i in range(60)]
    data = prepare_data(texts, Chars(), seq_len=32, val_fraction=0.1)
    train = torch.from_numpy(data.train.astype(np.int64))
    assert np.array_equal(data.doc_starts, torch.nonzero(train == 256).flatten().numpy())
    x, _, ids = batch_at(data.train, 0, 8, 32, doc_starts=data.doc_starts)
    assert torch.equal(ids[:, 1:] - ids[:, :-1], (x[:, 1:] == 256).long())
    v = data.val_rows[:, :-1]
    assert torch.equal(data.val_doc_ids[:, 1:-1] != data.val_doc_ids[:, :-2],
                       (v[:, 1:] == 256) | (v[:, 1:] == -100) & (v[:, :-1] != -100))


def test_trainer_trains_and_evaluates_under_the_mask():
    texts = [f"story {i} " * (i % 7 + 1) for i in range(60)]
    data = prepare_data(texts, Chars(), seq_len=32, val_fraction=0.1)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=258, multiple_of=32, max_seq_len=32)
    runs = {}
    for on in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0,
                          document_mask=on)
        history = Trainer(Transformer(args), data, cfg, device="cpu").fit(progress=False)
        runs[on] = history[-1]
    assert runs[True]["loss"] != runs[False]["loss"] and runs[True]["val_bpb"] > 0
    data.doc_starts = None
    with pytest.raises(ValueError, match="doc_starts"):
        Trainer(Transformer(args), data, TrainConfig(document_mask=True), device="cpu")
