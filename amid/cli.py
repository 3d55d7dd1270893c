"""The `amid` command line: a thin layer that parses, validates and calls the library.

Every expected failure (bad data, wrong cache, bad option) ends as one line on stderr and exit
status 1 or 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time

import click

from amid import __version__
from amid.errors import first_line

RANK_ERROR_GRACE_S = 30  # see friendly_errors


def friendly_errors(fn):
    """Turn the library's expected errors into one-line click errors.

    Under torchrun every rank meets the same refusal (bad data, a wrong cache, a diverged loss):
    rank 0 says it and the others wait RANK_ERROR_GRACE_S before saying it too, naming themselves
    (torchrun normally ends them first, once rank 0 has exited; waiting keeps them from ending rank
    0 before it has said anything, when it is still busy writing a checkpoint). Errors that are one
    rank's own are reported at once by that rank, naming itself: an OSError (its disk), or an
    error marked `this_rank_only` (cache-teacher's shards differ by rank)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from amid.cache import CacheError
        from amid.data import DataError
        from amid.distributed import world_from_env
        from amid.stop import Interrupted

        rank, _, world = world_from_env()
        try:
            return fn(*args, **kwargs)
        except Interrupted as exc:  # stopped on a signal, its work saved: rank 0 says how to continue
            raise Stopped(str(exc) if rank == 0 else None, exc.exit_code) from None
        except KeyboardInterrupt as exc:
            what = INTERRUPTED.get(click.get_current_context().info_name, "")
            how = "SIGTERM" if isinstance(exc, Terminated) else "interrupted"
            raise Stopped(f"{how}{'; ' + what if what else ''}" if rank == 0 else None,
                          143 if isinstance(exc, Terminated) else 130) from None
        except OSError as exc:  # FileNotFoundError too
            message = first_line(exc)
            raise click.ClickException(f"rank {rank}: {message}" if world > 1 else message) from None
        except (DataError, CacheError, ValueError, click.ClickException) as exc:
            own = world > 1 and getattr(exc, "this_rank_only", False)  # the other ranks do not meet it
            if world > 1 and rank > 0 and not own:
                # Rank 0 meets the same error and says it; torchrun then ends this process. Exiting at
                # once would let torchrun end rank 0 first where it is still busy (writing a checkpoint).
                time.sleep(RANK_ERROR_GRACE_S)
                raise click.ClickException(f"rank {rank}: {first_line(exc)}") from None  # rank 0 did not
            if isinstance(exc, click.ClickException):
                raise
            raise click.ClickException(f"rank {rank}: {first_line(exc)}" if own else first_line(exc)) from None

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit) where a command has no safe point of its own: ends it as
    Ctrl-C does, with SIGTERM's exit status."""


def _terminate_as_interrupt() -> None:
    """SIGTERM raises Terminated in the main thread, unless whoever started amid ignores it."""
    import signal

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        def handler(signum, frame):
            raise Terminated()
        signal.signal(signal.SIGTERM, handler)


# What an interruption outside a command's own safe points leaves (amid train saves at the end of
# a step and says so itself: amid.stop).
INTERRUPTED = {
    "cache-teacher": "the finished shards are kept: rerun the same command to continue",
    "train": "the last checkpoint (if any) is kept: continue with the same command and --resume",
    "sweep": "finished runs are kept: rerun the same command to continue",
    "eval": "nothing was written",
}


class Stopped(click.ClickException):
    """A command stopped on a signal: its line (no "Error:"; None: silent, another rank says it)
    and the shell's exit status for that signal."""

    def __init__(self, message: str | None, exit_code: int):
        super().__init__(message or "")
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        if self.message:
            click.echo(f"Stopped: {self.message}", err=True)


def _quiet_transformers(quiet: bool) -> None:
    """--quiet silences transformers' own progress bars too (loading and saving weights)."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="amid")
def main() -> None:
    """amid: cache a teacher's top-k distribution once, then distill students with AMiD.

    \b
    Stage one:  amid cache-teacher --teacher MODEL --data FILE --out CACHE
    Inspect:    amid cache-info CACHE [--verify] [--json]
    Stage two:  amid train --cache CACHE --student MODEL --out RUN
    Many runs:  amid sweep --cache CACHE --student MODEL --out SWEEP --alpha -1,0,0.5
    Evaluate:   amid eval --model RUN --data FILE [--rouge]
    """


def _json_object(ctx, param, value: str | None) -> dict | None:
    """A click callback: a JSON object given on the command line, as a dict (None if not given)."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc.msg} at column {exc.colno}): {value}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"must be a JSON object such as '{{\"enable_thinking\": false}}', got {value}")
    return parsed


def chat_options(fn):
    """The chat data options cache-teacher and eval share (the cache records them; sweep reads them there)."""
    for option in reversed((
        click.option("--messages-field", default="messages", show_default=True,
                     help="Chat data: a list of {role, content} messages per record; every assistant turn is a target."),
        click.option("--chat-template-kwargs", default=None, callback=_json_object,
                     help="Chat data: keyword arguments of the chat template itself, a JSON object "
                          "(Qwen3's '{\"enable_thinking\": false}')."),
        click.option("--chat-turns", type=click.Choice(["all", "last"]), default="all", show_default=True,
                     help="Conversations: every assistant turn is a target, or only the last (the others are context)."),
    )):
        fn = option(fn)
    return fn


@main.command("cache-teacher")
@click.option("--teacher", required=True, help="Teacher: Hugging Face hub name or local directory.")
@click.option("--data", required=True, help="JSONL/JSON/Parquet/CSV/text file or directory, or a datasets name.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to create or resume.")
@click.option("--top-k", default=64, show_default=True, help="Teacher tokens kept per target position.")
@click.option("--max-length", default=1024, show_default=True, help="Longest example in tokens.")
@click.option("--overflow", type=click.Choice(["error", "truncate", "skip"]), default="error", show_default=True,
              help="What to do with examples longer than --max-length.")
@click.option("--batch-size", default=16, show_default=True, help="Most sequences per teacher forward.")
@click.option("--max-tokens", default=16384, show_default=True, help="Most (padded) tokens per teacher forward.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Teacher body dtype (auto: bf16/fp16 on GPU, fp32 on CPU). LM head, top-k, tail: float32.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
@click.option("--device-map", type=click.Choice(["auto"]), default=None,
              help="A teacher larger than one GPU: spread its layers over every GPU this process sees (under torchrun, "
                   "the local rank's equal share of the node's GPUs). Needs accelerate.")
@click.option("--temperature", default=1.0, show_default=True, help="Teacher softmax temperature.")
@click.option("--template", type=click.Choice(["auto", "text", "plain", "dolly", "chat"]), default="auto",
              show_default=True, help="How records become token sequences (see README).")
@click.option("--prompt-field", default="prompt", show_default=True)
@click.option("--response-field", default="response", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@chat_options
@click.option("--split", default="train", show_default=True,
              help="Split of a datasets name or saved DatasetDict (a local file is one split: name its file).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only the first N records (the data is still read, and checked, whole).")
@click.option("--examples-per-shard", default=2048, show_default=True, help="Examples per shard, at most.")
@click.option("--positions-per-shard", default=262_144, show_default=True,
              help="Target positions per shard, at most (bounds the memory of reading one shard).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def cache_teacher_cmd(quiet: bool, **options) -> None:
    """Run the teacher over a dataset once; write top-k ids, log-probs and tail mass per target token.

    Response tokens are targets for instruction data (prompt/response fields, Dolly's
    instruction/context/response); every token is a target for plain text. Re-running the same
    command resumes a killed run; a directory holding another teacher's cache is refused.

    \b
    Example:
      amid cache-teacher --teacher gpt2-xl --data dolly_train.jsonl --out cache/ --top-k 64
    """
    from amid.teacher import CacheConfig, cache_teacher

    cfg = CacheConfig(**options)
    _terminate_as_interrupt()  # a killed run resumes anyway; this says so
    from amid.distributed import world_from_env

    if world_from_env()[0] == 0:  # under torchrun: once, not once per rank
        click.echo(f"config: {json.dumps(dataclasses.asdict(cfg))}", err=True)
    _quiet_transformers(quiet)
    cache_teacher(cfg, progress=not quiet, log=lambda m: click.echo(m, err=True))


@main.command("cache-info")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Read every shard: checksums, schema and counts.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (and verification) as JSON.")
@friendly_errors
def cache_info_cmd(cache_dir: str, verify: bool, as_json: bool) -> None:
    """Describe a cache: teacher, tokenizer, k, counts, size; --verify checks every shard.

    \b
    Example:
      amid cache-info cache/ --verify
    """
    from amid.cache import open_cache

    cache = open_cache(cache_dir)
    m = cache.manifest
    checked = cache.check() if verify else None
    if as_json:
        out = {k: v for k, v in m.items()}
        if checked is not None:
            out["verified"] = checked
        click.echo(json.dumps(out, indent=2))
        return
    c = m["counts"]
    limit = "" if m["data"].get("limit") is None else f", first {m['data']['limit']} records"
    rows = [
        ("cache", cache_dir),
        ("teacher", m["teacher"]["name_or_path"] + f" ({m.get('teacher_dtype', '?')}"
                    + (", LM head in float32)" if m.get("teacher_logits") == "float32 head" else ")")),
        ("tokenizer", f"{m['tokenizer']['vocab_size']} tokens, sha256 {m['tokenizer']['vocab_sha256'][:12]}…"),
        ("vocab (logits)", m["vocab_size"]),
        ("top-k", m["k"]),
        ("temperature", m["temperature"]),
        ("data", f"{m['data']['source']} (template {m['data']['template']}{limit})"),
        ("examples", c["examples"]),
        ("target positions", c["positions"]),
        ("truncated / too long / no target", f"{c.get('truncated', 0)} / {c.get('skipped_too_long', 0)} / "
                                             f"{c.get('skipped_no_target', 0)}"),
        *([("conversations split at their turns", c["split_conversations"])] if c.get("split_conversations") else []),
        ("shards", len(m["shards"])),
        ("size", f"{c['bytes'] / 1e6:.2f} MB ({c['bytes_per_position']:.1f} B/position)"),
        ("mean tail mass", f"{c['mean_tail_mass']:.4f}"),
    ]
    if checked is not None:
        rows.append(("verified", f"OK: {checked['shards']} shards, checksums, schema and counts"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


def _floats(text: str, flag: str | None = None) -> tuple[float, ...]:
    """Comma-separated numbers; a BadParameter naming `flag` (the option) otherwise."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=flag) from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@main.command("sweep")
@click.option("--cache", required=True, type=click.Path(file_okay=False), help="Teacher cache (stage one's --out).")
@click.option("--student", required=True, help="Student: hub name or local directory (the starting weights).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep directory (runs/, results.*).")
@click.option("--preset", "presets", default="amid", show_default=True,
              help="Comma list of presets: ce, kd, rkl, skl, srkl, gkd, taid, abkd, amid.")
@click.option("--alpha", "alphas", default="0.5", show_default=True, help="Comma list of α (for amid runs).")
@click.option("--lam", "lams", default="0.1", show_default=True, help="Comma list of λ (for amid runs).")
@click.option("--divergence", "divergences", default="kl", show_default=True, help="Comma list: kl, ab, tv, jsd.")
@click.option("--order", "orders", default="pr", show_default=True, help="Comma list: pr, rp, qr, rq.")
@click.option("--eval-data", default=None, help="Extra held-out data: perplexity (and ROUGE-L) per run.")
@click.option("--rouge-limit", type=click.IntRange(min=0), default=0, show_default=True,
              help="Prompts of --eval-data scored by ROUGE-L per run (0: no ROUGE-L).")
@click.option("--devices", default="", help="Comma list like cuda:0,cuda:1: one run per device at a time.")
@click.option("--train-arg", "train_args", multiple=True, metavar="KEY=VALUE",
              help="Training setting for every run, e.g. --train-arg max_steps=500 --train-arg lr=1e-4.")
@friendly_errors
def sweep_cmd(presets, alphas, lams, divergences, orders, devices, train_args, **options) -> None:
    """Train a grid of students from one cache; skip finished runs; write a table and plots.

    amid runs cross --alpha x --lam x --divergence x --order; the other presets run once each.
    Each run is a separate process: a failed run is recorded and the sweep goes on. Rerunning
    the same command finishes only the missing runs.

    \b
    Example:
      amid sweep --cache cache/ --student gpt2 --out sweep/ --preset kd,skl,amid \\
                 --alpha -3,-1,0,0.5,1 --lam 0.1,0.5 --train-arg max_steps=1000
    """
    from amid.sweep import SweepConfig, expand_grid, failed_runs, run_sweep
    from amid.train import TrainConfig

    # KEY is a field of amid train's config.json or one of its flags (--warmup, max-steps, ...).
    flags = {opt.lstrip("-").replace("-", "_"): p.name for p in train_cmd.params for opt in p.opts}
    bool_fields = {f.name for f in dataclasses.fields(TrainConfig) if f.type in (bool, "bool", "bool | None")}
    overrides = {}
    for item in train_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--train-arg needs KEY=VALUE, got {item!r}")
        key = key.strip().lstrip("-").replace("-", "_")
        key = flags.get(key, key)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            try:
                overrides[key] = float(value)  # what JSON does not read as a number: .001, 1e-4 is fine
            except ValueError:
                overrides[key] = value
        if key in bool_fields and overrides[key] is not None and not isinstance(overrides[key], bool):  # True, no, ...
            word = str(overrides[key]).strip().lower()
            if word not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise click.BadParameter(f"--train-arg {key} takes true or false, got {value!r}")
            overrides[key] = word in ("true", "yes", "1", "on")
    lists = {"--preset": presets, "--alpha": alphas, "--lam": lams, "--divergence": divergences, "--order": orders,
             **({"--devices": devices} if devices.strip() else {})}  # no --devices: the default device
    for option, text in lists.items():  # _words and _floats drop empty items: here each drops runs
        if text.strip() and not all(x.strip() for x in text.split(",")):
            raise ValueError(f"{option} {text!r}: an empty item; give a comma list without empty items")
    # An empty list is expand_grid's to judge: --alpha "" is fine for presets without α (kd, rkl, ...).
    cfg = SweepConfig(presets=_words(presets), alphas=_floats(alphas, "--alpha"), lams=_floats(lams, "--lam"),
                      divergences=_words(divergences), orders=_words(orders), devices=_words(devices),
                      train_overrides=overrides, **options)
    click.echo(run_sweep(cfg, log=lambda m: click.echo(m, err=True)))
    failed = failed_runs(cfg)
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(expand_grid(cfg))} runs failed ({', '.join(failed[:5])}"
                                   f"{', ...' if len(failed) > 5 else ''}); see {cfg.out}/results.md and each run's log.txt")


@main.command("eval")
@click.option("--model", required=True, help="A run directory (uses its final model), a model directory or hub name.")
@click.option("--data", required=True, help="Evaluation data (same formats as cache-teacher).")
@click.option("--template", type=click.Choice(["auto", "text", "plain", "dolly", "chat"]), default="auto", show_default=True)
@click.option("--prompt-field", default="prompt", show_default=True)
@click.option("--response-field", default="response", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@chat_options
@click.option("--max-length", default=1024, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N records (the data is still read, and checked, whole).")
@click.option("--split", default="train", show_default=True,
              help="Split of a datasets name or saved DatasetDict (a local file is one split: name its file).")
@click.option("--rouge", is_flag=True, help="Also sample responses and score ROUGE-L (instruction data).")
@click.option("--seeds", default="10,20,30,40,50", show_default=True, help="Sampling seeds for ROUGE-L (mean reported).")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Write eval.json (and generations.jsonl) here.")
@click.option("--quiet", is_flag=True, help="No progress bars (transformers' own, while loading).")
@friendly_errors
def eval_cmd(seeds: str, quiet: bool, **options) -> None:
    """Perplexity on the target tokens of a dataset; with --rouge, ROUGE-L of sampled generations.

    \b
    Example:
      amid eval --model sweep/runs/kd --data dolly_test.jsonl --rouge --out eval/
    """
    from amid.evaluate import EvalConfig, evaluate

    _quiet_transformers(quiet)
    numbers = _floats(seeds, "--seeds")
    if any(x != int(x) for x in numbers):
        raise click.BadParameter(f"sampling seeds are whole numbers, got {seeds!r}", param_hint="--seeds")
    result = evaluate(EvalConfig(seeds=tuple(int(x) for x in numbers), **options),
                      log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(result, indent=2))


from amid.losses import PRESETS  # noqa: E402  (torch is loaded by `import amid` already)


@main.command("train")
@click.option("--cache", required=True, type=click.Path(file_okay=False), help="Teacher cache (stage one's --out).")
@click.option("--student", required=True, help="Student: hub name or local directory (the starting weights).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (config, metrics, checkpoints).")
@click.option("--preset", default="amid", show_default=True, type=click.Choice(list(PRESETS)),
              help="Method; the options below override its settings.")
@click.option("--alpha", type=float, default=None, help="α of the α-mixture (any real; 1 = geometric). [preset's]")
@click.option("--lam", type=float, default=None, help="Teacher weight λ in [0, 1]. [preset's]")
@click.option("--lam-end", type=float, default=None, help="λ at the end of training, linear schedule (TAID). [preset's]")
@click.option("--divergence", default=None, help="kl, ab (α-β), tv or jsd. [preset's]")
@click.option("--order", default=None, help="pr = D(p,r), rp, qr or rq. [preset's]")
@click.option("--ab-alpha", type=float, default=None, help="α-β divergence a. [0.2]")
@click.option("--ab-beta", type=float, default=None, help="α-β divergence b. [0.7]")
@click.option("--jsd-beta", type=float, default=None, help="β of the generalised JSD. [0.5]")
@click.option("--ce-weight", type=float, default=None, help="w in (1-w)·KD + w·CE on ground-truth tokens. [0]")
@click.option("--tail", default=None, help="bucket (exact tail bin), bucket_unweighted or renorm (biased). [bucket]")
@click.option("--stop-grad-r/--no-stop-grad-r", default=None, help="Detach the student inside r (TAID does).")
@click.option("--lr", default=5e-5, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True)
@click.option("--min-lr-ratio", default=0.1, show_default=True,
              help="Cosine/linear schedules decay to lr x this (the constant one stays at lr).")
@click.option("--warmup", "warmup_steps", type=int, default=None, help="Warmup steps. [3% of the steps]")
@click.option("--weight-decay", default=0.01, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Sequences per batch.")
@click.option("--max-tokens", type=int, default=None, help="Batch by padded tokens instead of sequences.")
@click.option("--grad-accum", default=1, show_default=True, help="Batches per optimizer step (per process under torchrun).")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clip (0: none).")
@click.option("--epochs", default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps; overrides --epochs.")
@click.option("--eval-every", default=500, show_default=True, help="Steps between held-out evaluations.")
@click.option("--eval-fraction", default=0.05, show_default=True,
              help="Share of the cache held out (by example id; never trained on).")
@click.option("--eval-max-examples", default=1000, show_default=True,
              help="Held-out examples each evaluation uses, at most (a fixed choice, by a hash of example id).")
@click.option("--eval-cache", default=None, type=click.Path(file_okay=False), help="Evaluate on this cache instead.")
@click.option("--log-every", default=10, show_default=True)
@click.option("--save-every", default=500, show_default=True, help="Steps between checkpoints.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Autocast dtype (auto: bf16/fp16 on GPU, fp32 on CPU); weights stay fp32.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if available; under torchrun cuda:LOCAL_RANK).")
@click.option("--fused/--no-fused", default=None, help="LM head fused with the loss. [on for vocab >= 16k]")
@click.option("--online-teacher", default=None,
              help="Reference path: run this teacher every step, full-vocabulary loss (compare with the cache).")
@click.option("--eval-teacher", default=None,
              help="Keep this teacher in memory for evaluation only: adds eval_kl_full, the exact "
                   "full-vocabulary KL of the cache-trained student to it.")
@click.option("--lm-data", default=None,
              help="Plain text for an added language-modelling loss (files or a datasets name), as the paper mixes in.")
@click.option("--lm-weight", default=1.0, show_default=True, help="Weight of the language-modelling loss.")
@click.option("--lm-batch-size", type=int, default=None, help="Text blocks per cache batch. [--batch-size]")
@click.option("--lm-length", default=512, show_default=True, help="Tokens per text block.")
@click.option("--lm-text-field", default="text", show_default=True, help="Field holding the text in --lm-data.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward (less memory).")
@click.option("--num-workers", default=2, show_default=True, help="Threads reading cache shards.")
@click.option("--shuffle-buffer", default=4096, show_default=True,
              help="Examples shuffled together (whole shards are read; two windows are held in memory).")
@click.option("--shuffle-tokens", default=1 << 21, show_default=True,
              help="A shuffle window also closes at this many tokens: bounds the loader's memory for long "
                   "sequences (about 2 x tokens x k x 6 bytes).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def train_cmd(quiet: bool, **options) -> None:
    """Distill a student from a teacher cache with AMiD (or a classic preset).

    Writes RUN_DIR/config.json, metrics.jsonl (loss, lr, tokens/s; eval_kl, eval_ppl), checkpoint/
    (resumable with --resume), final/ (loadable by transformers' from_pretrained; every amid
    command takes RUN_DIR for it) and summary.json (the run's last figures).

    Several GPUs: launch it with torchrun, one process per GPU. Each step then takes
    --grad-accum batches on every GPU (the steps of one process with --grad-accum x GPUs,
    exactly so for a student without dropout). On several nodes, --cache and --out must be on
    a shared file system.

    \b
    Examples:
      amid train --cache cache/ --student gpt2 --out runs/a05 --alpha 0.5 --lam 0.1
      amid train --cache cache/ --student gpt2 --out runs/taid --preset taid --max-steps 2000
      torchrun --nproc-per-node 8 -m amid.cli train --cache cache/ --student gpt2 --out runs/a05
    """
    from amid.train import TrainConfig, TrainError, train

    try:
        _quiet_transformers(quiet)
        train(TrainConfig(progress=not quiet, **options), log=lambda m: click.echo(m, err=True))
    except TrainError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
