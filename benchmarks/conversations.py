"""Building a conversation's example: one tokenization with offsets vs one per prefix, side by side.

`amid.data._conversation` tokenizes a conversation once and cuts it at its turns (`_token_cuts`);
where a cut falls inside a token it tokenizes every context and turn prefix (2T of them for T
turns). This times both on the same conversations with the real Qwen2 tokenizer and chat template
(`../shared/tokenizers/qwen2`; skipped without it) and checks that they build the same example.
Run from the repository root: `python -m benchmarks.conversations`; figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import amid.data as data

QWEN2 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen2"
WORDS = "the a cat dog explain python function data model train value list string number".split()


def conversation(turns: int, rng: random.Random) -> list[dict[str, str]]:
    talk = []
    for _ in range(turns):
        talk += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=30))},
                 {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=80))}]
    return talk


def median_ms(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    if not QWEN2.exists():
        print(f"skipped: {QWEN2} not available")
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(QWEN2))
    cfg = data.TemplateConfig(template="chat")
    once = data._token_cuts
    print("| turns | tokens | tokenized once | every prefix | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for turns in (1, 10, 40):
        talk = conversation(turns, random.Random(turns))
        a = data._conversation(tokenizer, talk, cfg, "bench")
        t_once = median_ms(lambda: data._conversation(tokenizer, talk, cfg, "bench"))
        data._token_cuts = lambda *_: None
        try:
            b = data._conversation(tokenizer, talk, cfg, "bench")
            t_prefixes = median_ms(lambda: data._conversation(tokenizer, talk, cfg, "bench"))
        finally:
            data._token_cuts = once
        assert a == b, "the two paths built different examples"
        print(f"| {turns} | {len(a[0]):,} | {t_once:.1f} ms | {t_prefixes:.1f} ms | {t_once / t_prefixes:.2f}× |")


if __name__ == "__main__":
    main()
