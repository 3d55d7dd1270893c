"""The embedded-default demo: the whole amid pipeline on a laptop CPU, offline, in minutes.

    python -m pipelines.demo [--out demo_out] [--seed 0] [--quick]

1. Data: instruction pairs built from the Python documentation every CPython install carries
   (`pydoc_data.topics`): prompt "### Topic: … / ### Explanation:" (two lines), response one paragraph of it.
2. Tokenizer: a 1,024-token byte-level BPE trained on that text with `tokenizers`.
3. Teacher: a small Llama (~0.9M parameters) trained from scratch on the pairs.
4. Stage one: `cache_teacher` writes its top-k cache (k = 32).
5. Stage two: a sweep of a ~0.2M-parameter student over plain CE, kd, skl, taid and AMiD at
   several α — every run reads the same cache — then held-out KL/perplexity table and plot.

Every step is seeded; the numbers are reproducible for a seed on the same machine.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

PROMPT = "### Topic: {topic}\n### Explanation:\n"


def build_records(seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) instruction records from pydoc_data.topics; deterministic."""
    import pydoc_data.topics as topics

    records = []
    for name in sorted(topics.topics):
        text = topics.topics[name]
        title = text.strip().splitlines()[0].strip()
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if 80 <= len(para) <= 600 and not set(para) <= set("*=-~ "):
                records.append({"prompt": PROMPT.format(topic=title), "response": para})
    random.Random(seed).shuffle(records)
    n_test = max(50, len(records) // 20)
    return records[n_test:], records[:n_test]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def llama(vocab: int, hidden: int, layers: int, heads: int, seed: int, special_ids: tuple = (0, 0, 0)):
    """A random Llama; `special_ids` (bos, eos, pad) are the demo tokenizer's by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    bos, eos, pad = special_ids
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
                      pad_token_id=pad)
    return LlamaForCausalLM(cfg)


def train_teacher(records: list[dict], tokenizer, out: Path, steps: int, seed: int, log=print,
                  hidden: int = 128, layers: int = 4, max_length: int = 256, special_ids: tuple = (0, 0, 0)):
    """A plain LM loop on prompt+response text (the teacher's own supervised training)."""
    model = llama(len(tokenizer), hidden=hidden, layers=layers, heads=4, seed=seed, special_ids=special_ids)
    seqs = [tokenizer(r["prompt"] + r["response"])["input_ids"] + [tokenizer.eos_token_id] for r in records]
    seqs = [s[:max_length] for s in seqs]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    rng = random.Random(seed)
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        batch = rng.sample(seqs, 16)
        longest = max(map(len, batch))
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(s)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"  teacher step {step}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="working directory (default: demo_out, demo_out_quick with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out or ("demo_out_quick" if args.quick else "demo_out"))
    t_start = time.time()
    teacher_steps, student_steps = (30, 20) if args.quick else (400, 150)

    print(f"[1/5] data from pydoc_data.topics → {out / 'data'}")
    train, test = build_records(args.seed)
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "test.jsonl", test)
    print(f"      {len(train)} train / {len(test)} test instruction pairs")

    teacher_dir = out / "teacher"
    if (teacher_dir / "config.json").exists():
        print(f"[2/5] tokenizer and [3/5] teacher: reusing {teacher_dir}")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    else:
        print("[2/5] tokenizer: byte-level BPE, 1,024 tokens")
        tokenizer = train_tokenizer([r["prompt"] + r["response"] for r in train], teacher_dir)
        print(f"[3/5] teacher: Llama 4×128 trained {teacher_steps} steps")
        train_teacher(train, tokenizer, teacher_dir, teacher_steps, args.seed)
    student_dir = out / "student_init"
    if not (student_dir / "config.json").exists():
        llama(len(tokenizer), hidden=64, layers=2, heads=4, seed=args.seed + 1).save_pretrained(student_dir)
        tokenizer.save_pretrained(student_dir)

    print("[4/5] stage one: amid cache-teacher (k = 32)")
    from amid.teacher import CacheConfig, cache_teacher

    cache_dir = out / "cache"
    cache_teacher(CacheConfig(teacher=str(teacher_dir), data=str(out / "data" / "train.jsonl"), out=str(cache_dir),
                              top_k=32, max_length=256, overflow="truncate", examples_per_shard=512), progress=False)

    print("[5/5] stage two: sweep over one cache")
    from amid.sweep import SweepConfig, run_sweep

    sweep = SweepConfig(
        cache=str(cache_dir), student=str(student_dir), out=str(out / "sweep"),
        presets=("ce", "kd", "skl", "taid", "amid"), alphas=(-3.0, 0.0, 0.5, 1.0, 3.0), lams=(0.1,),
        train_overrides={"max_steps": student_steps, "batch_size": 16, "lr": 3e-3, "eval_every": student_steps,
                         "seed": args.seed, "warmup_steps": 10},
        eval_data=str(out / "data" / "test.jsonl"),
    )
    table = run_sweep(sweep)
    print(table)
    print(f"demo finished in {time.time() - t_start:.0f} s; results in {out / 'sweep'}")


if __name__ == "__main__":
    main()
