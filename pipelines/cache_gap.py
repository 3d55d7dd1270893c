"""What a top-k cache costs against an online teacher: which k to cache.

    python -m pipelines.cache_gap --teacher T --student S --data D [--k 8,32,64] [--out cache_gap_out]
    python -m pipelines.cache_gap --teacher T --random-student 64x2 --data D ...   # a fresh Llama student

For each k this caches the teacher's top-k of D (stage one) and trains the same student from it
(stage two) with the teacher kept for evaluation only (`--eval-teacher`); then it trains the
student once more with the teacher online, on the full vocabulary (`--online-teacher`, the
reference). Same student, seed, data order and steps everywhere. Every run is evaluated on the
same held-out examples (the cache's held-out split, or `--eval-data`) by the exact
full-vocabulary KL(p ‖ q) to the teacher and the perplexity of the references. Prints a
Markdown table (also OUT/cache_gap.md, OUT/cache_gap.json): the gap at each k is what the
truncated teacher costs the student.

Finished caches and runs in OUT are reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _k_list(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give top-k sizes of at least 1, e.g. 8,32,64")
    return ks


def _shape(text: str) -> tuple[int, int]:
    try:
        hidden, layers = (int(x) for x in text.lower().split("x"))
    except ValueError:
        hidden = layers = 0
    if hidden < 1 or layers < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give HIDDENxLAYERS, e.g. 64x2")
    return hidden, layers


def _cache(args, data: str, out: Path, k: int) -> dict[str, Any]:
    from amid.cache import open_cache
    from amid.teacher import CacheConfig, cache_teacher

    if not (out / "manifest.json").exists():
        cache_teacher(CacheConfig(teacher=args.teacher, data=data, out=str(out), top_k=k,
                                  max_length=args.max_length, overflow="truncate", limit=args.limit,
                                  template=args.template, device=args.device, dtype=args.dtype),
                      progress=False, log=lambda m: print(f"      {m}"))
    return open_cache(str(out)).manifest


def _same_settings(out: Path, args) -> None:
    """Finished caches and runs in OUT are reused, so OUT must not hold a comparison made with
    other settings (more values of --k are fine: each k has its own cache and run)."""
    settings = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in ("out", "k")}))
    path = out / "cache_gap_settings.json"
    holds_work = any(out.glob("cache_*")) or any(out.glob("run_*"))  # a failed first try holds none
    if path.exists() and holds_work:
        saved = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
        if changed:
            raise SystemExit(f"{out} holds a comparison made with other {', '.join(changed)} ({path}); "
                             f"use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _random_student(teacher: str, shape: tuple[int, int], out: Path, seed: int, max_length: int) -> str:
    """A randomly initialised Llama of HIDDENxLAYERS with the teacher's tokenizer and vocabulary."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (out / "config.json").exists():
        hidden, layers = shape
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        vocab = AutoConfig.from_pretrained(teacher).vocab_size
        torch.manual_seed(seed)
        heads = hidden // 16 if hidden % 16 == 0 else 1
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=max(8, hidden * 8 // 3 // 8 * 8),
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=max(1024, max_length), tie_word_embeddings=True,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        LlamaForCausalLM(cfg).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return str(out)


def _run(args, out: Path, cache: Path, eval_cache: Path | None, **teacher: str) -> dict[str, Any]:
    from amid.train import TrainConfig, train

    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    resume = (out / "config.json").exists()  # an interrupted run continues
    cfg = TrainConfig(cache=str(cache), student=args.student, out=str(out), preset=args.preset, alpha=args.alpha,
                      lam=args.lam, lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                      eval_every=args.steps, save_every=args.steps, seed=args.seed, device=args.device,
                      eval_cache=None if eval_cache is None else str(eval_cache), progress=False, resume=resume,
                      **teacher)
    return train(cfg, log=lambda m: None)


def _initial_eval(run_dir: Path) -> dict[str, Any]:
    """The step-0 evaluation of a run (also for a run that was resumed: its summary has none)."""
    from amid.train import read_metrics

    for record in read_metrics(run_dir / "metrics.jsonl"):
        if record["step"] == 0 and "eval_kl_full" in record:
            return record
    raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no evaluation at step 0; delete {run_dir} and rerun")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher model (hub name or directory)")
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--student", help="student to start from (shares the teacher's tokenizer)")
    who.add_argument("--random-student", metavar="HxL", type=_shape, help="start from a random Llama, e.g. 64x2, with the "
                     "teacher's tokenizer")
    ap.add_argument("--data", required=True, help="training data, as for amid cache-teacher")
    ap.add_argument("--eval-data", default=None, help="held-out data (default: the cache's held-out split)")
    ap.add_argument("--out", default="cache_gap_out")
    ap.add_argument("--k", default=[8, 32, 64], type=_k_list, help="comma-separated top-k sizes to compare")
    ap.add_argument("--template", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="first N examples of --data (and of --eval-data)")
    ap.add_argument("--max-length", type=int, default=128, help="examples are truncated to this many tokens")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--preset", default="amid")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="the teacher's dtype while caching (and online)")
    args = ap.parse_args(argv)
    from amid.cache import CacheError
    from amid.data import DataError
    from amid.distributed import world_from_env
    from amid.train import TrainError

    if world_from_env()[2] > 1:
        ap.error("runs its own caches and trainings one after another; launch it without torchrun")
    try:
        _compare(args)
    except (TrainError, DataError, CacheError, ValueError, OSError) as exc:
        raise SystemExit(f"cache_gap: {exc}") from None


def _compare(args) -> None:
    ks = args.k
    out = Path(args.out)
    start = time.time()
    _same_settings(out, args)
    if args.random_student:
        args.student = _random_student(args.teacher, args.random_student, out / "student_init", args.seed,
                                       args.max_length)

    caches: dict[int, dict[str, Any]] = {}
    for k in ks:
        print(f"[cache] top-{k} of {args.data}")
        caches[k] = _cache(args, args.data, out / f"cache_k{k}", k)
    eval_cache = None
    if args.eval_data:
        print(f"[cache] held-out {args.eval_data}")
        eval_cache = out / "cache_eval"
        _cache(args, args.eval_data, eval_cache, ks[0])  # its top-k is not used: eval_kl_full comes from the teacher

    results: list[tuple[str, dict[str, Any], float | None]] = []
    for k in ks:
        print(f"[train] from the top-{k} cache")
        summary = _run(args, out / f"run_k{k}", out / f"cache_k{k}", eval_cache, eval_teacher=args.teacher)
        results.append((f"cache, k = {k}", summary, caches[k]["counts"]["mean_tail_mass"]))
    print("[train] with the teacher online, full vocabulary")
    online = _run(args, out / "run_online", out / f"cache_k{ks[-1]}", eval_cache, online_teacher=args.teacher)
    results.append(("online teacher, full vocabulary", online, None))

    initial = _initial_eval(out / "run_online")
    lines = ["| student trained from | mean tail mass | held-out KL to teacher (full vocabulary) | held-out ppl |",
             "|---|---:|---:|---:|",
             f"| (initial student) | | {initial['eval_kl_full']:.4f} | {initial['eval_ppl']:.2f} |"]
    for name, summary, tail in results:
        gap = "" if tail is None else f" ({summary['eval_kl_full'] - online['eval_kl_full']:+.4f} vs online)"
        lines.append(f"| {name} | {'' if tail is None else f'{tail:.4f}'} | {summary['eval_kl_full']:.4f}{gap} "
                     f"| {summary['eval_ppl']:.2f} |")
    table = "\n".join(lines)
    (out / "cache_gap.md").write_text(table + "\n")
    (out / "cache_gap.json").write_text(json.dumps(
        {"args": vars(args), "runs": {name: s for name, s, _ in results}}, indent=2) + "\n")
    print(table)
    print(f"teacher {args.teacher} ({caches[ks[0]]['vocab_size']:,} tokens), {args.steps} steps of "
          f"{args.batch_size} sequences; held-out KL = the exact full-vocabulary KL(p ‖ q); "
          f"{time.time() - start:.0f} s; runs in {out}")


if __name__ == "__main__":
    main()
