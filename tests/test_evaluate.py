"""ROUGE-L against hand-computed cases (and the rouge-score package when installed)."""

import pytest

from amid.evaluate import rouge_l, rouge_tokens


def test_tokenization_matches_rouge_score_default():
    assert rouge_tokens("The cat, sat! on-the MAT.") == ["the", "cat", "sat", "on", "the", "mat"]


@pytest.mark.parametrize(
    "pred, ref, want",
    [
        # identical
        ("the cat sat", "the cat sat", 1.0),
        # nothing in common
        ("dog", "the cat sat", 0.0),
        ("", "the cat sat", 0.0),
        # LCS("the cat sat on the mat", "the cat lay on the mat") = the cat on the mat = 5; P = R = 5/6
        ("the cat sat on the mat", "the cat lay on the mat", 5 / 6),
        # LCS = "a c" (2); P = 2/3, R = 2/4; F = 2PR/(P+R) = 4/7
        ("a b c", "a x c y", 4 / 7),
        # order matters: LCS("c b a", "a b c") = 1; P = R = 1/3
        ("c b a", "a b c", 1 / 3),
    ],
)
def test_hand_computed(pred, ref, want):
    assert rouge_l(pred, ref) == pytest.approx(want, abs=1e-12)


def test_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the fox"),
        ("Paris is the capital of France.", "The capital of France is Paris"),
        ("1, 2, 3 go!", "go 3 2 1"),
    ]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure, abs=1e-12)


def test_chat_prompts_go_through_the_chat_template():
    from helpers import CHATML_TEMPLATE, train_tokenizer

    from amid.data import DataError
    from amid.evaluate import _encode_prompt

    tok = train_tokenizer(chat_template=CHATML_TEMPLATE)
    chat = tok.decode(_encode_prompt(tok, "Name a color.", chat=True)["input_ids"][0])
    assert chat.startswith("<|im_start|>user") and "Name a color." in chat
    assert chat.rstrip().endswith("<|im_start|>assistant")
    plain = tok.decode(_encode_prompt(tok, "Name a color.", chat=False)["input_ids"][0])
    assert plain == "Name a color."
    with pytest.raises(DataError, match="chat template"):
        _encode_prompt(train_tokenizer(), "x", chat=True)


def test_paper_table_reads_the_recipes_eval_files(tmp_path, capsys):
    import json as _json

    from pipelines.paper_table import SETS, main

    def put(run: str, stem: str, seeds: list[float]) -> None:
        d = tmp_path / "sweep" / "runs" / run / f"eval_{stem}"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(_json.dumps({"rougeL": sum(seeds) / len(seeds), "rougeL_per_seed": seeds}))

    assert main([str(tmp_path)]) == 1 and "no eval.json" in capsys.readouterr().out
    for i, (stem, _) in enumerate(SETS):
        put("kd", stem, [20.0 + i, 22.0 + i])
    put("amid_a0.5", "dolly_test", [30.0])
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | Dolly | SelfInst | Vicuna | S-NI | UnNI | average |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    # kd: mean 21 + i, sample std of (20 + i, 22 + i) = √2; average over the five sets 23.
    assert rows["kd"] == "| kd | 21.00 (1.41) | 22.00 (1.41) | 23.00 (1.41) | 24.00 (1.41) | 25.00 (1.41) | 23.00 |"
    assert rows["amid_a0.5"] == "| amid_a0.5 | 30.00 | · | · | · | · | · |"


def test_chat_prompts_take_the_templates_keyword_arguments():
    from helpers import NO_THINKING_TEMPLATE, train_tokenizer

    from amid.evaluate import _encode_prompt

    tok = train_tokenizer(300, chat_template=NO_THINKING_TEMPLATE)
    on = tok.decode(_encode_prompt(tok, "Hi", chat=True)["input_ids"][0])
    off = tok.decode(_encode_prompt(tok, "Hi", chat=True, chat_template_kwargs={"enable_thinking": False})["input_ids"][0])
    assert on.endswith("<|im_start|>assistant\n") and off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_generations_stop_at_the_templates_end_of_turn():
    from types import SimpleNamespace

    from helpers import CHATML_TEMPLATE, train_tokenizer

    from amid.evaluate import _stop_ids

    tok = train_tokenizer(chat_template=CHATML_TEMPLATE)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=tok.eos_token_id))
    assert _stop_ids(model, tok, chat=False) == [tok.eos_token_id]
    assert _stop_ids(model, tok, chat=True) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})


def test_perplexity_takes_logits_of_the_target_rows_only(tmp_path):
    # the same cross-entropy as the model's full logits, computed from its target rows
    import math

    import torch
    from helpers import make_model, train_tokenizer, write_jsonl

    from amid.data import TemplateConfig, build_examples, load_records
    from amid.evaluate import perplexity

    tok = train_tokenizer(300)
    model = make_model("llama", 300, tok)
    recs = [{"prompt": f"Q{i}: " + "word " * (i * 7 % 23), "response": "answer " * (1 + i % 5)} for i in range(11)]
    src = str(write_jsonl(tmp_path / "d.jsonl", recs))
    got = perplexity(model, tok, src, TemplateConfig(), batch_size=4)
    examples, _, _ = build_examples(load_records(src), tok, TemplateConfig(), src)
    nll = n = 0
    with torch.no_grad():
        for e in examples:
            z = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            t = torch.tensor(e.positions)
            nll += torch.nn.functional.cross_entropy(z[t], torch.tensor(e.input_ids)[t + 1], reduction="sum").item()
            n += len(e.positions)
    assert got["tokens"] == n and math.isclose(got["ce"], nll / n, rel_tol=1e-5)


def test_perplexity_reads_the_split_it_is_given(tmp_path):
    import datasets
    from helpers import make_model, train_tokenizer

    from amid.data import TemplateConfig
    from amid.evaluate import perplexity

    tok = train_tokenizer(300)
    model = make_model("llama", 300, tok)
    rows = [{"prompt": f"Q{i}: ", "response": "answer " * (i + 1)} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert perplexity(model, tok, str(tmp_path / "dd"), TemplateConfig())["examples"] == 3
    assert perplexity(model, tok, str(tmp_path / "dd"), TemplateConfig(), split="test")["examples"] == 1


def test_rouge_of_conversations_scores_the_last_assistant_turn(tmp_path):
    import json

    from helpers import CHATML_TEMPLATE, make_model, train_tokenizer, write_jsonl

    from amid.evaluate import _encode_prompt, generate_rouge

    tok = train_tokenizer(300, chat_template=CHATML_TEMPLATE)
    model = make_model("llama", 300, tok)
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Blue.<|im_end|>"}]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": talk}, {"messages": talk[:1]}])
    out = generate_rouge(model, tok, str(src), seeds=(1,), max_new_tokens=3, save_to=tmp_path / "g.jsonl")
    assert out["rouge_examples"] == 1 and out["rouge_skipped_no_reference"] == 1
    (row,) = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert row["prompt"] == talk[:3] and row["reference"] == "Blue."  # the literal end of turn is not text
    want = tok.apply_chat_template(talk[:3], add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert _encode_prompt(tok, talk[:3], chat=True)["input_ids"][0].tolist() == want


def test_eval_out_replacing_an_earlier_evaluation_says_so(tmp_path):
    import json

    from click.testing import CliRunner
    from helpers import make_model, train_tokenizer, write_jsonl

    from amid.cli import main

    tok = train_tokenizer(300)
    model = make_model("llama", 300, tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}: ", "response": "answer " * (i + 1)} for i in range(3)])
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--device", "cpu", "--out", str(out), "--quiet"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and "note:" not in first.stderr, first.output
    (out / "generations.jsonl").write_text("{}\n")  # as an earlier --rouge evaluation left it
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (f"note: {out / 'eval.json'} replaced an earlier evaluation's (its generations.jsonl removed: this one "
            f"has no --rouge)") in again.stderr
    assert not (out / "generations.jsonl").exists() and json.loads((out / "eval.json").read_text())["examples"] == 3


def test_bad_seeds_and_grid_numbers_name_their_option():
    from click.testing import CliRunner

    from amid.cli import main

    for args, message in ((["eval", "--model", "m", "--data", "d", "--seeds", "1,x"], "--seeds: expected comma"),
                          (["eval", "--model", "m", "--data", "d", "--seeds", "1.5"], "--seeds: sampling seeds are whole"),
                          (["sweep", "--cache", "c", "--student", "s", "--out", "o", "--alpha", "0.5,a"],
                           "--alpha: expected comma")):
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 2 and f"Invalid value for {message}" in out.output, out.output
