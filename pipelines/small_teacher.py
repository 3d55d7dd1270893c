"""A small Llama teacher trained from scratch on instruction data, with any tokenizer.

    python -m pipelines.small_teacher --tokenizer TOKENIZER_DIR --data train.jsonl --out teacher/ [--steps 400]

For trying amid on a real vocabulary size where no pretrained teacher is at hand (offline
machines): the demo's teacher loop (`pipelines.demo.train_teacher`: AdamW, one-cycle schedule,
batches of 16 prompt+response sequences) on records with `prompt` and `response` fields. The
model and the tokenizer are saved to --out, loadable by `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer (directory or hub name)")
    ap.add_argument("--data", required=True, help="JSONL with prompt and response fields")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256, help="tokens per training sequence (cut)")
    ap.add_argument("--limit", type=int, default=None, help="first N records")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from pipelines.demo import train_teacher

    with open(args.data, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()][: args.limit]
    if len(records) < 16 or any("prompt" not in r or "response" not in r for r in records):
        ap.error(f"{args.data}: need at least 16 records (one batch), each with prompt and response fields")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"teacher: Llama {args.layers}x{args.hidden}, {len(tokenizer):,} tokens, {len(records):,} records, "
          f"{args.steps} steps")
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    train_teacher(records, tokenizer, Path(args.out), args.steps, args.seed, hidden=args.hidden, layers=args.layers,
                  max_length=args.max_length, special_ids=specials)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
