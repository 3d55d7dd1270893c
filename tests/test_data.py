"""Records, templates, target positions (amid.data) and the top-k value codec (amid.codec)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amid.codec import LOGPROB_MANTISSA_BITS, encode_topk, id_dtype, round_logprobs
from amid.data import (
    TURN_SHIFT,
    DataError,
    TemplateConfig,
    build_examples,
    dolly_prompt,
    iter_batches,
    load_records,
    resolve_template,
)
from helpers import CHATML_TEMPLATE, NO_THINKING_TEMPLATE, THINKING_TEMPLATE, shared_path, train_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(300)


@pytest.fixture(scope="module")
def tok_bos():
    return train_tokenizer(300, add_bos=True)


@pytest.fixture(scope="module")
def tok_chat():
    return train_tokenizer(300, chat_template=CHATML_TEMPLATE)


def enc(tokenizer, s: str) -> list[int]:
    return tokenizer(s, add_special_tokens=False)["input_ids"]


def targets(ex) -> list[int]:
    """The tokens the positions predict: input_ids[t + 1] for t in positions."""
    return [ex.input_ids[t + 1] for t in ex.positions]


# ----------------------------------------------------------------------------------------------
# Templates and positions


def test_text_template_every_next_token_is_a_target(tok, tok_bos):
    recs = [{"text": "The quick brown fox."}, {"text": "Hello world"}]
    for t in (tok, tok_bos):
        exs, stats, template = build_examples(recs, t, TemplateConfig(), "mem")
        assert template == "text" and stats.examples == 2
        for ex, r in zip(exs, recs):
            bos = [t.bos_token_id] if t is tok_bos else []
            assert ex.input_ids == bos + enc(t, r["text"]) + [t.eos_token_id]
            # No BOS: the first token has no prediction; with BOS every text token is a target.
            assert ex.positions == list(range(len(ex.input_ids) - 1))
            assert targets(ex) == ex.input_ids[1:]


def test_plain_template_targets_only_response_and_eos(tok, tok_bos):
    rec = {"prompt": "What is the capital of France?\n", "response": "Paris."}
    for t in (tok, tok_bos):
        (ex,), _, template = build_examples([rec], t, TemplateConfig(), "mem")
        assert template == "plain"
        bos = [t.bos_token_id] if t is tok_bos else []
        p, r = enc(t, rec["prompt"]), enc(t, rec["response"])
        assert ex.input_ids == bos + p + r + [t.eos_token_id]
        assert ex.positions[0] == len(bos) + len(p) - 1  # the row that predicts the first response token
        assert targets(ex) == r + [t.eos_token_id]
        assert t.decode(targets(ex)[:-1]) == "Paris."


def test_custom_fields_and_output_alias(tok):
    (ex,), _, template = build_examples([{"q": "Name a colour.", "a": "Blue"}], tok,
                                       TemplateConfig(prompt_field="q", response_field="a"), "mem")
    assert template == "plain" and tok.decode(targets(ex)[:-1]) == "Blue"
    # `output` stands in for `response` (Alpaca/Dolly dev/test files).
    recs = [{"prompt": "Say hi.\n", "output": "hi"}]
    template, cfg = resolve_template(recs, TemplateConfig(), "mem")
    assert template == "plain" and cfg.response_field == "output"
    (ex,), _, _ = build_examples(recs, tok, TemplateConfig(), "mem")
    assert tok.decode(targets(ex)[:-1]) == "hi"


def test_dolly_instruction_context_response(tok):
    with_ctx = {"instruction": "Who won?", "context": "Team A beat team B.", "response": "Team A."}
    no_ctx = {"instruction": "Name a fruit.", "context": "", "response": "Apple."}
    template, _ = resolve_template([with_ctx], TemplateConfig(), "mem")
    assert template == "dolly"
    p = dolly_prompt(with_ctx)
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nWho won?\n\n### Input:\nTeam A beat team B.\n\n### Response:\n" in p
    q = dolly_prompt(no_ctx)
    assert q.startswith("Below is an instruction that describes a task. Write a response")
    assert "### Input" not in q and q.endswith("### Instruction:\nName a fruit.\n\n### Response:\n")
    exs, _, _ = build_examples([with_ctx, no_ctx], tok, TemplateConfig(), "mem")
    for ex, rec in zip(exs, [with_ctx, no_ctx]):
        prompt_ids = enc(tok, dolly_prompt(rec))
        assert ex.input_ids[: len(prompt_ids)] == prompt_ids
        assert ex.positions[0] == len(prompt_ids) - 1
        assert tok.decode(targets(ex)[:-1]) == rec["response"]
    # Alpaca-style `input` is the context too.
    assert dolly_prompt({"instruction": "Who won?", "input": "Team A beat team B."}) == p


def test_dolly_template_reproduces_the_reference_prompts():
    """The shared Dolly dev/test files carry the reference prompt next to instruction/input."""
    rows = [json.loads(line) for line in open(shared_path("data", "instruct", "dolly_dev.jsonl"))]
    assert any(r["input"].strip() for r in rows) and any(not r["input"].strip() for r in rows)
    assert all(dolly_prompt(r) == r["prompt"] for r in rows)
    # Loaded through the file loader: `output` is recognised and the file's own prompt is used.
    recs = load_records(str(shared_path("data", "instruct", "dolly_dev.jsonl")), limit=5)
    template, cfg = resolve_template(recs, TemplateConfig(), "dolly_dev")
    assert template == "plain" and cfg.response_field == "output"


def test_chat_template_targets_assistant_turn(tok_chat, tok):
    rec = {"prompt": "Name a colour.", "response": "Blue."}
    (ex,), _, template = build_examples([rec], tok_chat, TemplateConfig(template="chat"), "mem")
    assert template == "chat"
    msgs = [{"role": "user", "content": rec["prompt"]}]
    prompt_ids = list(tok_chat.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    # Targets: the answer through the end of turn; the template's newline after it is context.
    assert ex.positions == list(range(len(prompt_ids) - 1, len(ex.input_ids) - 2))
    assert tok_chat.decode(targets(ex)) == "Blue.<|im_end|>" and tok_chat.decode(ex.input_ids[-1:]) == "\n"
    with pytest.raises(DataError, match="chat template"):
        build_examples([rec], tok, TemplateConfig(template="chat"), "mem")


def test_chat_template_of_the_real_qwen2_tokenizer():
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2"))
    assert qwen.chat_template
    rec = {"prompt": "What is 2 + 2?", "response": "2 + 2 = 4."}
    (ex,), _, _ = build_examples([rec], qwen, TemplateConfig(template="chat"), "mem")
    text = qwen.decode(ex.input_ids)
    assert "<|im_start|>user\nWhat is 2 + 2?<|im_end|>" in text
    assert qwen.decode(targets(ex)) == "2 + 2 = 4.<|im_end|>"
    assert qwen.decode(ex.input_ids[: ex.positions[0] + 1]).endswith("<|im_start|>assistant\n")


def test_auto_template_choice_and_missing_fields(tok):
    assert resolve_template([{"text": "x", "prompt": "p", "response": "r"}], TemplateConfig(), "m")[0] == "text"
    assert resolve_template([{"prompt": "p", "response": "r"}], TemplateConfig(), "m")[0] == "plain"
    assert resolve_template([{"instruction": "i", "response": "r"}], TemplateConfig(), "m")[0] == "dolly"
    with pytest.raises(DataError, match=r"src: fields \['a', 'b'\] match no template"):
        resolve_template([{"a": 1, "b": 2}], TemplateConfig(), "src")
    with pytest.raises(DataError, match=r"needs field\(s\) \['body'\]"):
        resolve_template([{"text": "x"}], TemplateConfig(template="text", text_field="body"), "src")


def test_max_length_error_truncate_skip(tok):
    recs = [{"prompt": "Short?\n", "response": "Yes."},
            {"prompt": "A much longer prompt that goes on and on.\n", "response": "And a long response too."}]
    n_long = len(enc(tok, recs[1]["prompt"] + recs[1]["response"])) + 1
    limit = n_long - 5
    with pytest.raises(DataError, match=r"src record 2: the example has \d+ tokens, more than --max-length"):
        build_examples(recs, tok, TemplateConfig(max_length=limit), "src")
    exs, stats, _ = build_examples(recs, tok, TemplateConfig(max_length=limit, overflow="skip"), "src")
    assert [e.example_id for e in exs] == [0] and stats.skipped_too_long == 1
    exs, stats, _ = build_examples(recs, tok, TemplateConfig(max_length=limit, overflow="truncate"), "src")
    assert stats.truncated == 1 and len(exs[1].input_ids) == limit
    assert exs[1].positions[-1] == limit - 2
    # A prompt that fills the whole budget leaves no target: skipped and counted, not an error.
    n_short = len(enc(tok, recs[0]["prompt"] + recs[0]["response"])) + 1
    assert len(enc(tok, recs[1]["prompt"])) >= n_short
    exs, stats, _ = build_examples(recs, tok, TemplateConfig(max_length=n_short, overflow="truncate"), "src")
    assert [e.example_id for e in exs] == [0] and stats.skipped_empty == 1 and stats.cut_by_length == 1
    assert stats.truncated == 0  # counted once: dropped for want of a target, not also "truncated"
    with pytest.raises(ValueError):
        TemplateConfig(overflow="drop")
    # When nothing is left the error names the length, not the fields; with the model's context
    # shorter than the example, the hint is that context, not "raise --max-length".
    with pytest.raises(DataError, match=r"src: no example keeps a target token within --max-length 3 \(the prompts "
                                        r"fill it\); raise --max-length"):
        build_examples(recs, tok, TemplateConfig(max_length=3, overflow="truncate"), "src")
    with pytest.raises(DataError, match=r"src: every example is longer than --max-length 3, and --overflow skip"):
        build_examples(recs, tok, TemplateConfig(max_length=3, overflow="skip"), "src")
    with pytest.raises(DataError, match=rf"src record 2: .* more than --max-length {limit}; the model's context is "
                                        rf"{limit - 1}: pass --max-length {limit - 1} with --overflow truncate"):
        build_examples(recs, tok, TemplateConfig(max_length=limit), "src", context=limit - 1)
    with pytest.raises(DataError, match=r"check the fields \(1 lost theirs to --max-length"):
        build_examples([recs[1], {"prompt": "p", "response": ""}], tok,
                       TemplateConfig(max_length=n_short, overflow="truncate"), "src")


def test_iter_batches_cover_each_example_once(tok):
    recs = [{"text": "word " * n} for n in range(1, 30)]
    exs, _, _ = build_examples(recs, tok, TemplateConfig(), "m")
    batches = list(iter_batches(exs, max_tokens=64, max_batch=4))
    seen = sorted(e.example_id for b in batches for e in b)
    assert seen == list(range(len(recs)))
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or max(len(e.input_ids) for e in b) * len(b) <= 64


# ----------------------------------------------------------------------------------------------
# Loading records


def test_load_records_formats(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("prompt,response\n" + "".join(f"p{i},r{i}\n" for i in range(5)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("line one\nline two\n")
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        assert load_records(str(tmp_path / name)) == rows, name
    assert load_records(str(tmp_path / "a.jsonl"), limit=2) == rows[:2]
    assert [r["text"] for r in load_records(str(tmp_path / "e.txt"))] == ["line one", "line two"]


def test_load_records_refusals(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="'~' is not expanded here; pass /"):
        load_records("~/data.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError, match=rf"{bad}:3: malformed JSON"):
        load_records(str(bad))
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{notobj}:2: expected a JSON object"):
        load_records(str(notobj))
    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.json", "[]"), ("empty.csv", "")]:
        f = tmp_path / name
        f.write_text(content)
        with pytest.raises(DataError, match="no records"):
            load_records(str(f))


# ----------------------------------------------------------------------------------------------
# Codec


def _reference_round(x: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest-even to `bits` explicit mantissa bits, exactly, in float64."""
    m, e = np.frexp(x.astype(np.float64))  # x = m·2^e, 0.5 ≤ |m| < 1: bits + 1 significant bits
    return np.ldexp(np.round(np.ldexp(m, bits + 1)), e - bits - 1)  # np.round is half-to-even


@pytest.mark.parametrize("bits", [LOGPROB_MANTISSA_BITS, 10, 5])
def test_round_logprobs_is_exact_round_to_nearest_even(bits):
    rng = np.random.default_rng(bits)
    x = -np.exp(rng.uniform(np.log(1e-4), np.log(6e4), 200_000)).astype(np.float32)
    r = round_logprobs(x, bits)
    assert r.dtype == np.float16
    assert np.array_equal(r.astype(np.float64), _reference_round(x, bits))
    err = np.abs(r.astype(np.float64) - x) / np.abs(x.astype(np.float64))
    assert err.max() <= 2.0 ** -(bits + 1)


def test_round_logprobs_ties_go_to_even_and_are_unbiased():
    # Exactly halfway between two 8-bit values: 1 + (2j + 1)·2^-9 for j = 0..255, times 2^e.
    j = np.arange(256)
    mid = -(1.0 + (2 * j + 1) * 2.0**-9) * 4.0
    r = round_logprobs(mid.astype(np.float32)).astype(np.float64)
    down, up = -(1.0 + 2 * j * 2.0**-9) * 4.0, -(1.0 + (2 * j + 2) * 2.0**-9) * 4.0
    assert np.array_equal(r, np.where(j % 2 == 0, down, up))  # the even neighbour each time
    # Unbiased: the mean relative error over many values is far below the bound.
    x = -np.random.default_rng(0).uniform(0.01, 30, 1_000_000).astype(np.float32)
    rel = (round_logprobs(x).astype(np.float64) - x) / np.abs(x.astype(np.float64))
    assert abs(rel.mean()) < 2.0**-9 / 100
    # Truncation (what a plain bit mask would do) is visibly biased by comparison.
    trunc = (x.view(np.uint32) & np.uint32(~((1 << 15) - 1) & 0xFFFFFFFF)).view(np.float32)
    assert abs(((trunc.astype(np.float64) - x) / np.abs(x)).mean()) > 2.0**-9 / 10


def test_round_logprobs_special_values():
    x = np.array([-np.inf, np.inf, 0.0, -0.0, np.nan, -1e-30, -1e-6, -70000.0], np.float32)
    r = round_logprobs(x)
    assert np.isneginf(r[0]) and np.isposinf(r[1]) and r[2] == 0 and np.signbit(r[3]) and np.isnan(r[4])
    # Below float16's normal range the absolute error is at most one float16 subnormal step
    # (log p ≈ 0 means p ≈ 1: an absolute error of 6e-8 in log p is negligible).
    assert abs(float(r[5]) - -1e-30) <= 2.0**-24 and abs(float(r[6]) - -1e-6) <= 2.0**-24
    # Beyond float16's range a log-probability becomes −inf: exp(−70000) is 0 in float32 too.
    assert np.isneginf(r[7])
    with pytest.raises(ValueError):
        round_logprobs(x, 11)


def test_id_dtype_by_vocab_size():
    assert id_dtype(300) == np.uint16 and id_dtype(50257) == np.uint16 and id_dtype(65536) == np.uint16
    assert id_dtype(65537) == np.uint32 and id_dtype(151936) == np.uint32


def test_encode_topk_sorts_ids_and_keeps_pairs():
    rng = np.random.default_rng(0)
    V, P, k = 151936, 50, 64
    ids = np.stack([rng.choice(V, k, replace=False) for _ in range(P)])
    lps = -rng.exponential(3.0, (P, k)).astype(np.float32)
    e_ids, e_lps = encode_topk(ids, lps, V)
    assert e_ids.dtype == np.uint32 and e_lps.dtype == np.float16
    assert (np.diff(e_ids.astype(np.int64), axis=1) > 0).all()
    for i in range(P):
        pairs = dict(zip(ids[i].tolist(), round_logprobs(lps[i]).tolist()))
        assert dict(zip(e_ids[i].tolist(), e_lps[i].tolist())) == pairs
    assert encode_topk(ids % 50257, lps, 50257)[0].dtype == np.uint16


def test_records_know_their_file_and_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes('\ufeff{"prompt": "p0", "response": "r0"}\n\n{"prompt": "p1", "response": "r1"}\n'.encode())
    records = load_records(str(f))
    assert [r["prompt"] for r in records] == ["p0", "p1"]
    assert [records.where(i) for i in range(2)] == [f"{f}:1", f"{f}:3"]
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "x.jsonl", [{"prompt": "a", "response": "b"}])
    (d / "y.json").write_text(json.dumps([{"prompt": "c", "response": "d"}] * 2))
    records = load_records(str(d))
    assert [records.where(i) for i in range(3)] == [f"{d / 'x.jsonl'}:1", f"{d / 'y.json'} (element 0)",
                                                   f"{d / 'y.json'} (element 1)"]
    assert load_records(str(f), limit=1).where(0) == f"{f}:1"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: not UTF-8 text \(byte 0xff at column 13\)"):
        load_records(str(bad))
    # Text files: a record per line, named by its line (universal newlines, as datasets reads them).
    text = tmp_path / "t.txt"
    text.write_bytes(b"one\ntwo\r\nthree\rfour\n\nsix")
    records = load_records(str(text))
    assert [r["text"] for r in records] == ["one", "two", "three", "four", "", "six"]
    assert [records.where(i) for i in (0, 5)] == [f"{text}:1", f"{text}:6"]
    text.write_bytes(b"fine\nnot \xff fine\n")
    with pytest.raises(DataError, match=rf"{text}:2: not UTF-8 text \(byte 0xff at column 5\)"):
        load_records(str(text))
    text.write_bytes(b"a\rb\r\xff\rc\n")  # the line as the records count them: lone CRs end lines too
    with pytest.raises(DataError, match=rf"{text}:3: not UTF-8 text \(byte 0xff at column 1\)"):
        load_records(str(text))


def test_records_without_a_response_are_skipped_and_counted(tok, tmp_path):
    f = tmp_path / "r.jsonl"
    write_jsonl(f, [{"prompt": "a", "response": "yes"}, {"prompt": "b"}, {"prompt": "c", "response": None},
                    {"prompt": "d", "response": "  "}, {"prompt": "e", "response": "no"}])
    examples, stats, template = build_examples(load_records(str(f)), tok, TemplateConfig(), str(f))
    assert template == "plain" and [e.example_id for e in examples] == [0, 4]
    assert stats.skipped_empty == 3 and stats.first_empty == f"{f}:2"
    write_jsonl(f, [{"prompt": "a", "response": "yes"}, {"prompt": "b", "response": ["x"]}])
    with pytest.raises(DataError, match=rf"{f}:2: field 'response' holds a list, not text"):
        build_examples(load_records(str(f)), tok, TemplateConfig(), str(f))
    write_jsonl(f, [{"prompt": "a", "response": 42}])  # a number (CSV columns) is text
    (ex,), _, _ = build_examples(load_records(str(f)), tok, TemplateConfig(), str(f))
    assert enc(tok, "42")[0] in ex.input_ids


def test_a_response_ending_in_the_eos_text_gets_one_eos(tok, tok_chat):
    eos = tok.eos_token
    plain = {"prompt": "Q?\n", "response": "Paris."}
    literal = {"prompt": "Q?\n", "response": f"Paris.{eos}\n"}
    (a,), _, _ = build_examples([plain], tok, TemplateConfig(), "mem")
    (b,), _, _ = build_examples([literal], tok, TemplateConfig(), "mem")
    assert b.input_ids == a.input_ids and targets(b)[-1] == tok.eos_token_id
    assert targets(b).count(tok.eos_token_id) == 1
    (c,), _, _ = build_examples([plain], tok_chat, TemplateConfig(template="chat"), "mem")
    (d,), _, _ = build_examples([{**literal, "response": f"Paris.{tok_chat.eos_token}"}], tok_chat,
                                TemplateConfig(template="chat"), "mem")
    assert d.input_ids == c.input_ids
    # Without a closing EOS (add_eos=False) the text is the user's own ending: kept.
    (e,), _, _ = build_examples([literal], tok, TemplateConfig(add_eos=False), "mem")
    assert targets(e).count(tok.eos_token_id) == 1 and targets(e)[-1] != tok.eos_token_id
    # In the middle of a response, or in plain text, it is text like any other.
    mid = {"prompt": "Q?\n", "response": f"a{eos}b"}
    (f,), _, _ = build_examples([mid], tok, TemplateConfig(), "mem")
    assert targets(f).count(tok.eos_token_id) == 2


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2's kind): every input starts with a "▁", and "</s>"
    is its EOS, so the text "<|endoftext|>" is no token of it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # "▁" before the input's first word only, newlines tokens of their own (Llama's <0x0A>).
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                                                 pre_tokenizers.Split("\n", behavior="isolated")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["### Instruction:\nName a colour.\n\n### Response:\nRed is one. Blue is another."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("which", ["metaspace", "stories260K"])
def test_a_response_is_tokenized_as_the_continuation_of_its_prompt(which):
    # A SentencePiece tokenizer starts a separately tokenized response with a "▁" the whole text
    # lacks: the student would learn to open every answer with a space. And MiniLLM's Dolly ends
    # every response in the text "<|endoftext|>", which such a tokenizer spells in a dozen tokens.
    if which == "stories260K":
        from transformers import AutoTokenizer

        t = AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))
    else:
        t = _metaspace_tokenizer()
    record = {"instruction": "Name a colour.", "response": "Red is one.<|endoftext|>"}
    (ex,), _, template = build_examples([record], t, TemplateConfig(), "mem")
    assert template == "dolly"
    prompt = dolly_prompt(record)
    assert t.convert_ids_to_tokens(t("Red", add_special_tokens=False)["input_ids"])[0].startswith("▁")  # the trap
    whole = t(prompt + "Red is one.", add_special_tokens=False)["input_ids"]
    bos = ex.input_ids[: len(ex.input_ids) - len(whole) - 1]
    assert ex.input_ids == bos + whole + [t.eos_token_id]  # the whole text once, then EOS
    assert targets(ex) == whole[len(t(prompt, add_special_tokens=False)["input_ids"]):] + [t.eos_token_id]
    assert not t.convert_ids_to_tokens(targets(ex))[0].startswith("▁")
    assert t.decode(targets(ex)[:-1]) == "Red is one."


def test_a_prompt_whose_last_token_merges_into_the_response_keeps_its_own_tokens(tok):
    # "Q: " + "Paris": GPT-2-like byte BPE joins the space to "Paris"; generation starts from the
    # prompt's own tokens (ending in the space), so the response is tokenized on its own.
    record = {"prompt": "Q: ", "response": "Paris"}
    (ex,), _, _ = build_examples([record], tok, TemplateConfig(), "mem")
    prompt_ids = tok("Q: ", add_special_tokens=False)["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert targets(ex) == tok("Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_chat_splice_keeps_the_templates_end_of_turn():
    # The generation prompt ends in a space that the response's first word takes in the whole
    # conversation (" fine"): the prompt's tokens are not a prefix of the conversation's. The
    # splice keeps the prompt as it is tokenized at generation time and the template's own end of
    # turn (not a bare EOS).
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    t = train_tokenizer(300, chat_template=template)
    msgs = [{"role": "user", "content": "hello there"}]
    prompt = list(t.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
    whole = list(t.apply_chat_template(msgs + [{"role": "assistant", "content": "fine"}], tokenize=True)["input_ids"])
    assert whole[: len(prompt)] != prompt  # the case under test
    (ex,), _, _ = build_examples([{"prompt": "hello there", "response": "fine"}], t, TemplateConfig(template="chat"), "m")
    assert ex.input_ids[: len(prompt)] == prompt and ex.positions[0] == len(prompt) - 1
    assert t.decode(targets(ex)) == "fine<|im_end|>"
    assert t.eos_token_id not in targets(ex)


def test_chat_response_starting_with_a_newline_in_the_real_qwen2_template():
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2"))
    (ex,), _, _ = build_examples([{"prompt": "Hi", "response": "\n\nHello"}], qwen, TemplateConfig(template="chat"), "m")
    assert qwen.decode(ex.input_ids[: ex.positions[0] + 1]).endswith("<|im_start|>assistant\n")
    assert qwen.decode(targets(ex)) == "\n\nHello<|im_end|>"


def test_text_or_chat_records_that_end_in_their_closing_token_text_are_closed_once(tok, tok_chat):
    eos = tok.eos_token
    (a,), _, _ = build_examples([{"text": "Hello world."}], tok, TemplateConfig(template="text"), "m")
    (b,), stats, _ = build_examples([{"text": f"Hello world.{eos}"}, {"text": eos}], tok, TemplateConfig(template="text"),
                                    "m")
    assert b.input_ids == a.input_ids and b.input_ids.count(tok.eos_token_id) == 1
    assert stats.skipped_empty == 1  # a record that is only the separator has nothing to learn
    # A chat response ending in the template's literal end of turn: one <|im_end|>, not two.
    (c,), _, _ = build_examples([{"prompt": "Q?", "response": "Paris."}], tok_chat, TemplateConfig(template="chat"), "m")
    (d,), _, _ = build_examples([{"prompt": "Q?", "response": "Paris.<|im_end|>"}], tok_chat,
                                TemplateConfig(template="chat"), "m")
    im_end = tok_chat.convert_tokens_to_ids("<|im_end|>")
    assert d.input_ids == c.input_ids and targets(d).count(im_end) == 1


def test_chat_end_of_turn_of_the_templates(tok, tok_chat):
    from amid.data import chat_end_of_turn

    assert chat_end_of_turn(tok_chat) == tok_chat.convert_tokens_to_ids("<|im_end|>")
    assert chat_end_of_turn(tok) is None  # no chat template
    plain = train_tokenizer(300, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert chat_end_of_turn(plain) is None  # no special token closes its turns


def test_chat_end_of_turn_of_the_real_qwen2_template():
    from transformers import AutoTokenizer

    from amid.data import chat_end_of_turn

    qwen = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2"))
    assert qwen.convert_ids_to_tokens(chat_end_of_turn(qwen)) == "<|im_end|>"


def test_chat_template_that_rewrites_the_prompt_is_spliced_and_closed_by_eos():
    # A template that renders the user turn differently once an assistant turn follows: the
    # prompt's tokens are not a prefix of the whole, so the response is spliced after them.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{% if loop.last %}U: {% else %}User: {% endif %}"
                "{{ m['content'] }}\n{% else %}A: {{ m['content'] }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}A: {% endif %}")
    t = train_tokenizer(300, chat_template=template)
    (ex,), _, _ = build_examples([{"prompt": "hello there", "response": "fine"}], t, TemplateConfig(template="chat"), "m")
    prompt = t.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)  # a BatchEncoding in new transformers
    assert ex.input_ids == prompt + enc(t, "fine") + [t.eos_token_id]
    assert targets(ex) == enc(t, "fine") + [t.eos_token_id]


def test_datasets_save_to_disk_directories_and_text_byte_order_marks(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert [dict(r) for r in load_records(str(tmp_path / "one"))] == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(str(tmp_path / "dict"), split="test")) == 1
    with pytest.raises(DataError, match="no split 'dev'.*--split"):
        load_records(str(tmp_path / "dict"), split="dev")
    # A file or a one-split Dataset has no other split: --split is refused, not ignored.
    with pytest.raises(DataError, match="one split, and --split test names another"):
        load_records(str(tmp_path / "one"), split="test")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    with pytest.raises(DataError, match="rows.jsonl: --split test applies to a datasets name.*point --data at"):
        load_records(str(tmp_path / "rows.jsonl"), split="test")
    (tmp_path / "bom.txt").write_text("line one\nline two\n", encoding="utf-8-sig")
    assert [r["text"] for r in load_records(str(tmp_path / "bom.txt"))] == ["line one", "line two"]


def test_unreadable_csv_and_text_name_the_reason(tmp_path):
    (tmp_path / "ragged.csv").write_text('prompt,response\n"a","b"\n"c","d","e"\n')
    with pytest.raises(DataError, match="Expected 2 fields in line 3"):
        load_records(str(tmp_path / "ragged.csv"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:1: not UTF-8 text \(byte 0xe9 at column 4\)"):
        load_records(str(tmp_path / "latin1.txt"))


def test_a_json_file_holding_one_object_is_refused_in_words(tmp_path):
    f = tmp_path / "wrapped.json"
    f.write_text(json.dumps({"data": [{"prompt": "p", "response": "r"}], "version": 1}, indent=2))
    with pytest.raises(DataError, match=r"wrapped.json: holds one JSON object \(keys: data, version\), not records"):
        load_records(str(f))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p",\n')  # broken, not an object: still named by line
    with pytest.raises(DataError, match=r"bad.jsonl:1: malformed JSON"):
        load_records(str(bad))


def test_example_changes_between_versions():
    from amid.data import EXAMPLE_CHANGES, example_changes

    assert [c.split(":")[0] for c in example_changes("0.2.0", "0.4.0")] == ["0.3.0", "0.4.0"]
    assert [c.split(":")[0] for c in example_changes("0.3.0rc1", "0.4.0")] == ["0.4.0"]
    assert example_changes("0.4.0", "0.4.0") == []
    assert len(example_changes(None, "99.0.0")) == len(EXAMPLE_CHANGES)  # an unknown old version: all


def test_a_chat_template_that_raises_names_the_record(tmp_path):
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn first') }}{% endif %}"
    t = train_tokenizer(300, chat_template=template)
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: the tokenizer's chat template refused .*a system turn first"):
        build_examples(load_records(str(f)), t, TemplateConfig(template="chat"), str(f))


def test_a_saved_dataset_dict_split_is_chosen_or_named(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dd"))
    assert [r["prompt"] for r in load_records(str(tmp_path / "dd"), split="test")] == ["p2"]
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, test\); pass --split, or point --data at "
                                        r".*dd/train"):
        load_records(str(tmp_path / "dd"), split="dev")


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Thanks!"}]


def test_chat_messages_every_assistant_turn_is_a_target(tok_chat, tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    (ex,), stats, template = build_examples(load_records(str(f)), tok_chat, TemplateConfig(), str(f))
    assert template == "chat"  # auto: a messages field
    assert stats.skipped_empty == 1 and stats.first_empty == f"{f}:2"  # no assistant turn: nothing to learn
    # The whole conversation up to its last answer (the trailing user turn has nothing to learn).
    rendered = tok_chat.apply_chat_template(CONVERSATION[:5], tokenize=True)
    assert ex.input_ids == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert tok_chat.decode(targets(ex)) == "Blue.<|im_end|>Red.<|im_end|>"
    # Two spans: the second answer's context (the user's "Another?") is not a target.
    gaps = [b for a, b in zip(ex.positions, ex.positions[1:]) if b != a + 1]
    assert len(gaps) == 1 and "Another?" in tok_chat.decode(ex.input_ids[ex.positions[0]: gaps[0]])


def test_chat_messages_are_checked_and_end_once(tok_chat, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "text": "hi"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'messages' must be a list of messages"):
        build_examples(load_records(str(bad)), tok_chat, TemplateConfig(), str(bad))
    closed = [dict(m, content=m["content"] + "<|im_end|>") if m["role"] == "assistant" else m for m in CONVERSATION]
    (a,), _, _ = build_examples([{"messages": CONVERSATION}], tok_chat, TemplateConfig(template="chat"), "m")
    (b,), _, _ = build_examples([{"messages": closed}], tok_chat, TemplateConfig(template="chat"), "m")
    assert b.input_ids == a.input_ids and b.positions == a.positions


def test_chat_messages_in_the_real_qwen2_template_with_a_turn_opening_on_a_newline():
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2"))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "\nSure."}]
    (ex,), _, _ = build_examples([{"messages": msgs}], qwen, TemplateConfig(), "m")
    assert qwen.decode(targets(ex)) == "Hello.<|im_end|>\nSure.<|im_end|>"
    text = qwen.decode(ex.input_ids)
    assert text == qwen.apply_chat_template(msgs, tokenize=False)  # the same text, spliced at the turns
    context = qwen.apply_chat_template(msgs[:3], add_generation_prompt=True, tokenize=True)
    context = list(context["input_ids"] if hasattr(context, "keys") else context)
    second = [b for a, b in zip(ex.positions, ex.positions[1:]) if b != a + 1][0]  # the second turn's first row
    assert ex.input_ids[: second + 1] == context  # the second answer follows its context's own tokens


def test_chat_messages_opening_turns_empty_turns_and_tool_calls(tok_chat):
    # A tool-call template: the assistant turn's tool_calls are rendered, so they must reach it.
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "{% if m.get('tool_calls') %}call:{{ m['tool_calls'][0]['name'] }}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    t = train_tokenizer(300, chat_template=template)
    talk = [{"role": "assistant", "content": "Welcome!"},  # nothing prompted it: context
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "weather"}]},  # OpenAI's null content
            {"role": "tool", "content": "20C"},
            {"role": "assistant", "content": " "},  # empty: context
            {"role": "user", "content": "So?"},
            {"role": "assistant", "content": "Warm."}]
    (ex,), _, _ = build_examples([{"messages": talk}], t, TemplateConfig(), "m")
    assert t.decode(targets(ex)) == "call:weather<|im_end|>Warm.<|im_end|>"
    assert "Welcome!" in t.decode(ex.input_ids) and "Welcome!" not in t.decode(targets(ex))
    # Only an opening turn: nothing to learn, skipped and counted.
    _, stats, _ = build_examples([{"messages": talk[:1]}, {"messages": talk[:3]}], t, TemplateConfig(), "m")
    assert stats.skipped_empty == 1 and stats.examples == 1


def _rendered(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in new transformers


def test_a_conversation_whose_template_rewrites_earlier_turns_is_one_example_per_turn(tmp_path):
    # Qwen3's template drops an assistant turn's <think> block once a user turn follows: no one
    # sequence holds both answers as they were generated, so each becomes an example of its own,
    # the conversation up to it (as the template renders it then) as context.
    t = train_tokenizer(300, chat_template=THINKING_TEMPLATE)
    talk = [{"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "<think>\nred or blue\n</think>\n\nBlue."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "<think>\nnot blue\n</think>\n\nRed."}]
    assert not t.apply_chat_template(talk, tokenize=False).startswith(t.apply_chat_template(talk[:2], tokenize=False))
    f = write_jsonl(tmp_path / "talk.jsonl", [{"messages": CONVERSATION}, {"messages": talk}, {"messages": talk}])
    examples, stats, _ = build_examples(load_records(str(f)), t, TemplateConfig(), str(f))
    assert stats.split_conversations == 2 and stats.first_split == f"{f}:2" and stats.examples == 5
    # Record 0 (its template renders the same whatever follows) stays one example with its id; a
    # split record's first example keeps the record's id, the n-th after it adds n << TURN_SHIFT.
    later = 1 << TURN_SHIFT
    assert [(e.example_id, e.record) for e in examples] == [(0, 0), (1, 1), (1 + later, 1), (2, 2), (2 + later, 2)]
    assert [e.turn for e in examples] == [0, 0, 1, 0, 1]
    first, second = examples[1:3]
    assert first.input_ids == _rendered(t, talk[:2])
    assert t.decode(targets(first)) == "<think>\nred or blue\n</think>\n\nBlue.<|im_end|>"
    assert second.input_ids == _rendered(t, talk)
    context = _rendered(t, talk[:3], add_generation_prompt=True)  # the first answer without its <think>
    assert second.input_ids[: second.positions[0] + 1] == context
    assert t.decode(targets(second)) == "<think>\nnot blue\n</think>\n\nRed.<|im_end|>"
    # --max-length names the record and the turn that overflows.
    g = write_jsonl(tmp_path / "one.jsonl", [{"messages": talk}])
    with pytest.raises(DataError, match=r"every example is longer than --max-length 20, and --overflow skip drops"):
        build_examples(load_records(str(g)), t, TemplateConfig(max_length=20, overflow="skip"), str(g))
    with pytest.raises(DataError, match=rf"{g}:1: the example \(its assistant turn 2\) has \d+ tokens"):
        build_examples(load_records(str(g)), t, TemplateConfig(max_length=len(first.input_ids) + 1), str(g))


def test_chat_turns_last_makes_the_earlier_answers_context(tok_chat):
    cfg = TemplateConfig(chat_turns="last")
    (ex,), _, _ = build_examples([{"messages": CONVERSATION}], tok_chat, cfg, "m")
    assert tok_chat.decode(targets(ex)) == "Red.<|im_end|>"
    assert ex.input_ids == _rendered(tok_chat, CONVERSATION[:5])  # the same sequence as with every turn
    # A template that rewrites earlier turns: one example, not one per turn.
    t = train_tokenizer(300, chat_template=THINKING_TEMPLATE)
    talk = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\na\n</think>\n\nA1."},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>\nb\n</think>\n\nA2."}]
    (only,), stats, _ = build_examples([{"messages": talk}], t, cfg, "m")
    assert stats.split_conversations == 0 and only.input_ids == _rendered(t, talk)
    assert t.decode(targets(only)) == "<think>\nb\n</think>\n\nA2.<|im_end|>"
    with pytest.raises(ValueError, match="--chat-turns must be all or last"):
        TemplateConfig(chat_turns="first")


def test_chat_template_kwargs_reach_the_template():
    # Qwen3 with enable_thinking=False: the empty <think> block is the generation prompt's, so it
    # is context; without the argument the turn as rendered opens with it and it is a target.
    t = train_tokenizer(300, chat_template=NO_THINKING_TEMPLATE)
    record = {"prompt": "Name a colour.", "response": "Blue."}
    (default,), _, _ = build_examples([record], t, TemplateConfig(template="chat"), "m")
    assert t.decode(targets(default)) == "<think>\n\n</think>\n\nBlue.<|im_end|>"
    cfg = TemplateConfig(template="chat", chat_template_kwargs={"enable_thinking": False})
    (off,), _, _ = build_examples([record], t, cfg, "m")
    assert t.decode(targets(off)) == "Blue.<|im_end|>"
    assert off.input_ids[: off.positions[0] + 1] == _rendered(t, [{"role": "user", "content": "Name a colour."}],
                                                              add_generation_prompt=True, enable_thinking=False)
    assert off.input_ids == default.input_ids  # the same text; only where the target starts moved
    with pytest.raises(ValueError, match="--chat-template-kwargs must be a JSON object"):
        TemplateConfig(chat_template_kwargs=["enable_thinking"])
    with pytest.raises(ValueError, match="--chat-template-kwargs: add_generation_prompt, tokenize are set by amid"):
        TemplateConfig(chat_template_kwargs={"tokenize": True, "add_generation_prompt": True, "tools": []})
    # Reasoning in an answer whose generation prompt opens with an empty <think> block: no one
    # sequence holds both, so the answer follows the prompt as written, closed by the template's
    # end of turn (not EOS), and counted.
    thought = {"prompt": "Name a colour.", "response": "<think>\nblue?\n</think>\n\nBlue."}
    (_, loose), stats, _ = build_examples([record, thought], t, cfg, "m")
    assert stats.loose_answers == 1 and stats.first_loose == "m record 2"
    assert t.decode(targets(loose)) == "<think>\nblue?\n</think>\n\nBlue.<|im_end|>"


def _random_conversations(seed: int, n: int):
    """Conversations whose turns open and close on newlines, spaces, digits and literal special
    tokens: the cases where a turn's first token can merge with its context's last."""
    import random

    rng = random.Random(seed)
    pieces = ["the", "cat", "\n", "\n\n", " ", "  ", "1.", "2", "Hello!", "<|im_end|>", "é", "日本", "\t", "x = 1"]

    def text():
        return "".join(rng.choice(pieces) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(0, 10)))

    for _ in range(n):
        talk = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            talk += [{"role": "user", "content": text() or "q"}, {"role": "assistant", "content": text()}]
        yield talk


def _both_ways(tokenizer, talk):
    """A conversation through the one-tokenization path and through the per-prefix one."""
    import amid.data

    cfg = TemplateConfig(template="chat")
    turns = amid.data._answers(talk)
    fast = amid.data._conversation(tokenizer, talk, turns, cfg, "m")
    real = amid.data._token_cuts
    amid.data._token_cuts = lambda *_: None
    try:
        exact = amid.data._conversation(tokenizer, talk, turns, cfg, "m")
    finally:
        amid.data._token_cuts = real
    return fast, exact


def test_conversations_tokenized_once_equal_every_prefix_tokenized(tok_chat):
    for talk in _random_conversations(0, 150):
        fast, exact = _both_ways(tok_chat, talk)
        assert fast == exact, talk


def test_conversations_tokenized_once_equal_every_prefix_tokenized_in_the_real_qwen2_template():
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2"))
    for talk in _random_conversations(1, 150):
        fast, exact = _both_ways(qwen, talk)
        assert fast == exact, talk


def test_a_long_conversation_is_tokenized_in_time_linear_in_its_length(tok_chat):
    class Counting:  # the tokenizer, counting the characters it is asked to tokenize
        def __init__(self, inner):
            self.inner, self.chars = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, texts, **kw):
            self.chars += sum(map(len, [texts] if isinstance(texts, str) else texts))
            return self.inner(texts, **kw)

    talk = []
    for i in range(30):
        talk += [{"role": "user", "content": f"question {i} about the cat"},
                 {"role": "assistant", "content": f"the answer {i} is the dog and the bird"}]
    counting = Counting(tok_chat)
    (ex,), _, _ = build_examples([{"messages": talk}], counting, TemplateConfig(template="chat", max_length=4096), "m")
    length = len(tok_chat.apply_chat_template(talk, tokenize=False))
    assert counting.chars <= 3 * length, (counting.chars, length)  # every prefix would be ~30x
    assert tok_chat.decode(targets(ex)).count("<|im_end|>") == 30


def test_a_file_mixing_the_fields_of_two_templates_is_refused_naming_both(tok, tmp_path):
    # As a JSON table reads it: every record has every column, absent values None.
    rows = [{"prompt": f"Q{i}", "response": f"A{i}", "text": None} for i in range(5)]
    rows[3] = {"prompt": None, "response": None, "text": "a document"}
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed.jsonl:4: this record has the fields of template 'text', "
                                        r".*mixed.jsonl:1 those of 'plain'.*pass --template"):
        build_examples(load_records(str(f)), tok, TemplateConfig(), str(f))
    examples, stats, template = build_examples(load_records(str(f)), tok, TemplateConfig(template="plain"), str(f))
    assert template == "plain" and stats.examples == 4 and stats.skipped_empty == 1


def test_an_unreadable_parquet_or_csv_file_is_one_line_without_the_librarys_own(tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 100, "response": ["b"] * 100}), bad)
    whole = bad.read_bytes()
    bad.write_bytes(whole[: len(whole) // 2] + whole[-8:])  # a copy cut short, its footer kept
    with pytest.raises(DataError, match=r"bad.parquet: could not be read as parquet"):
        load_records(str(bad))
    assert "Failed to read" not in capfd.readouterr().err  # datasets' logger stayed quiet


def test_auto_picks_the_template_of_the_first_record_with_its_fields_set(tok, tmp_path):
    # A first record whose response is empty (a table's None) matches no template alone.
    rows = [{"prompt": "Q0", "response": None}] + [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(1, 4)]
    f = write_jsonl(tmp_path / "first_empty.jsonl", rows)
    examples, stats, template = build_examples(load_records(str(f)), tok, TemplateConfig(), str(f))
    assert template == "plain" and stats.examples == 3 and stats.skipped_empty == 1
