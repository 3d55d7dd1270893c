"""One cache, many runs: a grid of AMiD/preset trainings that all read the same teacher cache.

Each run is its own process (`python -m amid.sweep --run RUN_DIR`), so a crash of one run is
recorded and the others go on; runs already finished are skipped on restart. With several GPUs
the runs are spread one per device. At the end: results.csv, results.md and plots.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from amid.cache import write_json_atomic
from amid.data import CHAT_SETTINGS
from amid.distributed import world_from_env
from amid.paths import same_setting
from amid.stop import Interrupted, StopRequest, signal_name

__all__ = ["SweepConfig", "expand_grid", "device_slots", "run_sweep", "failed_runs"]

# Presets whose objective does not depend on α (they fix their own mixture or have none).
ALPHA_FREE = {"kd", "rkl", "skl", "srkl", "gkd", "taid", "abkd", "ce"}
# TrainConfig fields the sweep sets for every run (--train-arg may not).
GRID_KEYS = frozenset({"cache", "student", "out", "preset", "alpha", "lam", "divergence", "order", "resume"})
# Exit statuses of a run that stopped on SIGINT/SIGTERM: by itself (amid.stop), or killed by it in
# its start-up, before Python's handler (SIGTERM's default ends the process).
STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}
# What a --train-arg value may be, by the TrainConfig field's annotation (JSON values, as the CLI parses them).
_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "None": ("null", lambda v: v is None),
    "tuple[float, float]": ("two numbers ([a, b])", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                            and all(_KINDS["float"][1](x) for x in v)),
}
RESULT_FIELDS = ["run", "preset", "alpha", "lam", "divergence", "order", "status", "eval_kl", "eval_ppl",
                 "test_ppl", "rougeL", "train_tokens", "wall_s", "error"]


@dataclass(frozen=True)
class SweepConfig:
    cache: str
    student: str
    out: str
    presets: tuple[str, ...] = ("amid",)
    alphas: tuple[float, ...] = (0.5,)
    lams: tuple[float, ...] = (0.1,)
    divergences: tuple[str, ...] = ("kl",)
    orders: tuple[str, ...] = ("pr",)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    eval_data: str | None = None  # extra held-out data for perplexity (and ROUGE-L)
    rouge_limit: int = 0  # prompts scored by ROUGE-L per run (0: skip)
    devices: tuple[str, ...] = ()  # e.g. ("cuda:0", "cuda:1"); empty: one run at a time on the default


def _fmt(x: float) -> str:
    return f"{x:g}".replace("-", "m")


def expand_grid(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The runs of the grid: α-dependent presets (amid) cross α × λ × divergence × order;
    α-free presets run once each with their own defaults. A value given twice is one run (one
    directory, trained once); ValueError for an empty list, or two values under one run name."""
    grid = {"--alpha": cfg.alphas, "--lam": cfg.lams, "--divergence": cfg.divergences, "--order": cfg.orders}
    empty = [opt for opt, values in {"--preset": cfg.presets, **grid}.items() if not values]
    if empty and (empty[0] == "--preset" or any(p not in ALPHA_FREE for p in cfg.presets)):
        raise ValueError(f"{empty[0]}: no values; the grid would have no runs")
    runs: dict[str, dict[str, Any]] = {}
    for preset in cfg.presets:
        if preset in ALPHA_FREE:
            runs.setdefault(preset, {"name": preset, "preset": preset, "loss": {}})
            continue
        for alpha, lam, div, order in itertools.product(cfg.alphas, cfg.lams, cfg.divergences, cfg.orders):
            name = f"{preset}_a{_fmt(alpha)}_l{_fmt(lam)}_{div}_{order}"
            run = {"name": name, "preset": preset, "loss": {"alpha": alpha, "lam": lam, "divergence": div, "order": order}}
            if runs.setdefault(name, run) != run:  # _fmt keeps 6 digits: 0.1234567 and 0.1234568 share a name
                raise ValueError(f"run {name}: two settings under one name ({runs[name]['loss']} and {run['loss']}); "
                                 f"give values that differ in their first 6 digits")
    return list(runs.values())


def _run_dir(cfg: SweepConfig, name: str) -> Path:
    return Path(cfg.out) / "runs" / name


def _spec(cfg: SweepConfig, run: dict[str, Any], cache_id: str) -> dict[str, Any]:
    return {
        "train": {**cfg.train_overrides, "cache": cfg.cache, "student": cfg.student,
                  "out": str(_run_dir(cfg, run["name"])), "preset": run["preset"], **run["loss"]},
        "cache_id": cache_id,  # the cache's content (amid.cache.Cache.content_id): --cache may be replaced
        "eval_data": cfg.eval_data,
        "rouge_limit": cfg.rouge_limit,
        "run": run,
    }


def _status(run_dir: Path) -> str | None:
    """The status its result.json gives a run ("ok", "failed"), None without one."""
    try:
        return json.loads((run_dir / "result.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _finished(old: dict[str, Any] | None, spec: dict[str, Any], run_dir: Path) -> bool:
    """Whether a run needs nothing: it ended "ok" with this spec's training and either this
    evaluation or, where the sweep asks for none (no --eval-data), whatever evaluation it has (a
    rerun that extends the grid keeps the test results). Its cache is this one: `_check_existing`
    refuses a run dir trained on another."""
    if _status(run_dir) != "ok" or old is None:
        return False
    keys = ("train", "run") if spec["eval_data"] is None else ("train", "run", "eval_data", "rouge_limit")
    return all(same_setting(old.get(k), spec[k]) for k in keys)


def _eval_template(manifest: dict[str, Any]) -> dict[str, Any]:
    """How --eval-data is read: the cache's own template and fields, so that test perplexity and
    ROUGE-L see the format training saw (a chat template above all); other templates read the
    test file by its fields. EvalConfig (and TemplateConfig) fields."""
    data = manifest.get("data", {})
    fields = data.get("fields", {})
    return {"template": "chat" if data.get("template") == "chat" else "auto",
            **{f"{k}_field": v for k, v in fields.items() if k in ("prompt", "response", "text", "messages")},
            **{name: data[name] for name in CHAT_SETTINGS if data.get(name)},
            **({"max_length": data["max_length"]} if isinstance(data.get("max_length"), int) else {})}


def run_one(run_dir: Path, device: str | None = None) -> dict[str, Any]:
    """Train and evaluate one run described by RUN_DIR/sweep_run.json; writes result.json.
    `device` (its --devices slot) replaces the training setting's."""
    from amid.train import TrainConfig, train

    spec = json.loads((run_dir / "sweep_run.json").read_text())
    if device:
        spec["train"]["device"] = device
    t0 = time.time()
    # resume=True: a run killed mid-way continues from its checkpoint; a fresh one starts at step 0.
    summary = train(TrainConfig(**{**spec["train"], "resume": True}))
    result = {"status": "ok", **{k: summary.get(k) for k in ("eval_kl", "eval_ppl", "train_tokens")}}
    if spec.get("eval_data"):
        from amid.evaluate import EvalConfig, evaluate

        from amid.cache import open_cache

        as_cached = _eval_template(open_cache(spec["train"]["cache"], verify=False).manifest)
        ev = evaluate(EvalConfig(model=str(run_dir), data=spec["eval_data"], rouge=spec["rouge_limit"] > 0, **as_cached,
                                 rouge_limit=spec["rouge_limit"] or None, seeds=(10,), max_new_tokens=64,
                                 device=spec["train"].get("device", "auto")))
        result["test_ppl"] = ev["ppl"]
        result["rougeL"] = ev.get("rougeL")
    result["wall_s"] = round(time.time() - t0, 1)
    write_json_atomic(run_dir / "result.json", result)
    return result


def device_slots(devices: tuple[str, ...], environ: Mapping[str, str] = os.environ
                 ) -> list[tuple[str | None, dict[str, str], str | None]]:
    """(entry, the child's environment changes, the child's training device) per --devices entry.

    `cuda:N` is the N-th device this process sees (the N-th entry of CUDA_VISIBLE_DEVICES where
    that is set), made the child's only visible one and trained on as "cuda": a GPU missing there
    fails the run, where "auto" would train on the CPU. `cuda` is cuda:0. ValueError, naming the
    entry, for one that is not cpu, cuda or cuda:N, a device this process does not see, or a
    device given twice. No entries: one run at a time on the training setting's device."""
    import torch

    if not devices:
        return [(None, {}, None)]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    listed = None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]
    slots, seen = [], {}
    for entry in devices:
        match = re.fullmatch(r"cpu|cuda(?::(\d+))?", entry)
        if match is None:
            raise ValueError(f"--devices {entry}: not a device; each entry is cpu, cuda or cuda:N")
        index = None if entry == "cpu" else int(match.group(1) or 0)
        if index in seen:
            raise ValueError(f"--devices {seen[index]} and {entry}: the same device twice"
                             f"{' (cuda is cuda:0)' if 'cuda' in (seen[index], entry) else ''}; name each once"
                             f"{' (a run on the CPU uses all its cores already)' if index is None else ''}")
        seen[index] = entry
        if index is None:
            slots.append((entry, {}, "cpu"))
            continue
        if listed is not None and index >= len(listed):
            raise ValueError(f"--devices {entry}: cuda:N is the N-th of CUDA_VISIBLE_DEVICES={visible}, which "
                             f"lists {len(listed)} device(s)")
        if index >= count:
            raise ValueError(f"--devices {entry}: torch {torch.__version__} sees "
                             f"{f'{count} CUDA device(s), cuda:0 to cuda:{count - 1}' if count else 'no CUDA device'}"
                             f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}")
        slots.append((entry, {"CUDA_VISIBLE_DEVICES": listed[index] if listed is not None else str(index)}, "cuda"))
    return slots


def run_sweep(cfg: SweepConfig, log=print) -> str:
    """Run every missing run of the grid, then write results.csv, results.md and plots.

    Returns the Markdown table."""
    if world_from_env()[2] > 1:  # every rank would run the whole grid, each child joining the group
        raise ValueError("amid sweep starts its own processes, one run per --devices entry; run it without "
                         "torchrun (train one run on several GPUs with torchrun ... amid.cli train)")
    out = Path(cfg.out)
    runs = expand_grid(cfg)
    slots = device_slots(cfg.devices)
    cache_id = _check(cfg, runs)
    specs = {run["name"]: json.loads(json.dumps(_spec(cfg, run, cache_id))) for run in runs}
    _check_existing(cfg, runs, specs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    pending = []
    for run in runs:
        d = _run_dir(cfg, run["name"])
        spec = specs[run["name"]]
        if _finished(_old_spec(d), spec, d):
            continue
        # Same training, other evaluation settings (checked in _check_existing): the run resumes at its last
        # step, trains nothing and is evaluated again.
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(d / "sweep_run.json", spec)
        pending.append(run)
    log(f"sweep: {len(runs)} runs, {len(runs) - len(pending)} already finished, {len(pending)} to run")
    _execute(cfg, pending, log, slots)
    return _report(cfg, runs, log)


def _old_spec(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "sweep_run.json").read_text())
    except (OSError, ValueError):
        return None


def _check(cfg: SweepConfig, runs: list[dict[str, Any]]) -> str:
    """Refuse, before any directory is written or any run starts, what would make runs fail for
    certain: a setting TrainConfig does not know or accept, a missing or damaged cache, a student
    with another tokenizer, or --eval-data that evaluation cannot read. Returns the cache's
    content id."""
    from amid.cache import open_cache
    from amid.models import load_tokenizer
    from amid.teacher import resolve_device
    from amid.train import TrainConfig, TrainError, check_tokenizer

    if cfg.rouge_limit < 0:
        raise ValueError(f"--rouge-limit must be at least 0 (0: no ROUGE-L), got {cfg.rouge_limit}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(cfg.train_overrides) - known)
    if unknown:
        raise ValueError(f"--train-arg {', '.join(unknown)}: not a training setting; the settings are the "
                         f"fields of amid train's config.json: {', '.join(sorted(known - GRID_KEYS))}")
    if "resume" in cfg.train_overrides:
        raise ValueError("--train-arg resume: the sweep always resumes its runs (a killed run continues from its "
                         "checkpoint, a finished one is kept)")
    gridded = sorted(set(cfg.train_overrides) & GRID_KEYS)
    if gridded:
        raise ValueError(f"--train-arg {', '.join(gridded)}: set by the sweep itself (--cache, --student, --out, "
                         f"--preset, --alpha, --lam, --divergence, --order); pass it there")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in cfg.train_overrides.items():
        kinds = [k.strip() for k in types[key].split("|")] if isinstance(types[key], str) else []
        if kinds and all(k in _KINDS for k in kinds) and not any(_KINDS[k][1](value) for k in kinds):
            # TrainConfig would fail on it with a TypeError (lr > 0) or let the run fail later.
            raise ValueError(f"--train-arg {key} takes {' or '.join(_KINDS[k][0] for k in kinds)}, got {value!r}")
    if "device" in cfg.train_overrides:
        if cfg.devices:
            raise ValueError("--train-arg device: --devices sets each run's device; pass one or the other")
        resolve_device(cfg.train_overrides["device"])  # what train refuses: a device this machine lacks
    for run in runs:
        try:
            TrainConfig(**{**_spec(cfg, run, "")["train"], "resume": True})
        except (ValueError, TypeError) as exc:  # TypeError: a field of a type the checks above do not know
            raise ValueError(f"run {run['name']}: {exc}") from None
    cache = open_cache(cfg.cache)
    trust = cfg.train_overrides.get("trust_remote_code") is True
    tokenizer = load_tokenizer(cfg.student, "--student", trust)
    try:
        check_tokenizer(cfg.student, cache, tokenizer)
    except TrainError as exc:
        raise ValueError(str(exc)) from None
    if cfg.eval_data and cache.manifest.get("data", {}).get("template") == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"--eval-data: the cache {cfg.cache} was built with --template chat, and the student "
                             f"{cfg.student}'s tokenizer has no chat template to evaluate through; give the student "
                             f"the teacher's chat template (tokenizer_config.json), or drop --eval-data")
    if cfg.eval_data:
        _check_eval_data(cfg, cache, tokenizer, trust)
    return cache.content_id


def _check_existing(cfg: SweepConfig, runs: list[dict[str, Any]], specs: dict[str, dict[str, Any]]) -> None:
    """Refuse run directories trained with other settings under the same names, or on another
    cache than the one now at --cache (same path, other shards), before any run starts."""
    clash, other_cache = [], []
    for run in runs:
        d = _run_dir(cfg, run["name"])
        old = _old_spec(d)
        if old is None:
            continue
        was, now = old.get("train") or {}, specs[run["name"]]["train"]
        changed = sorted(k for k in {*was, *now} if not same_setting(was.get(k), now.get(k)))
        if changed or old.get("run") != specs[run["name"]]["run"]:
            clash.append(f"{run['name']} ({', '.join(changed) or 'loss'})")
        elif _trained_cache_id(d, old) not in (None, specs[run["name"]]["cache_id"]):
            other_cache.append(run["name"])
    if clash:
        raise ValueError(f"{cfg.out}: runs trained with other settings under the same names: {'; '.join(clash)}; "
                         f"rerun with those settings, delete the runs, or choose another --out")
    if other_cache:
        raise ValueError(f"{cfg.out}: runs trained on another cache than the one now at {cfg.cache} (its shards "
                         f"differ): {', '.join(other_cache[:3])}{', ...' if len(other_cache) > 3 else ''}; rerun with "
                         f"that cache, delete the runs, or choose another --out")


def _trained_cache_id(run_dir: Path, spec: dict[str, Any]) -> str | None:
    """The content id of the cache a run has trained on: its checkpoint's; without one (deleted
    to save space), its sweep_run.json's if the run finished, else None (sweep_run.json is
    written before the run starts: a run that failed before its first checkpoint trained on
    nothing)."""
    import torch

    from amid.train import STATE_FILE

    state = run_dir / "checkpoint" / STATE_FILE
    if not state.exists():
        return spec.get("cache_id") if _status(run_dir) == "ok" else None

    try:
        return torch.load(state, map_location="cpu", weights_only=False, mmap=True).get("cache_id", spec.get("cache_id"))
    except Exception:  # a damaged checkpoint: the run's own resume says so, naming the file
        return None


def _check_eval_data(cfg: SweepConfig, cache, tokenizer, trust: bool) -> None:
    """Read --eval-data as run_one's evaluation will (amid.evaluate: perplexity, then ROUGE-L), so
    that a missing, malformed or mismatched file is refused before the grid trains, not after."""
    from amid.data import DataError, Records, TemplateConfig, build_examples, load_records
    from amid.evaluate import _prompts_and_references
    from amid.models import model_context

    as_cached = _eval_template(cache.manifest)
    template = TemplateConfig(**as_cached, overflow="truncate")
    context = model_context(cfg.student, trust)  # a run directory: its model's
    if context and template.max_length > context:
        template = dataclasses.replace(template, max_length=context)
    try:
        records = load_records(cfg.eval_data)
        build_examples(records, tokenizer, template, cfg.eval_data)
        if cfg.rouge_limit > 0 and template.messages_field not in records[0]:  # conversations: build_examples read them
            first = Records(records[:cfg.rouge_limit], records.source, records.locations)
            if not _prompts_and_references(first, cfg.eval_data, template.prompt_field, template.response_field)[1]:
                raise DataError(f"{cfg.eval_data}: none of the first {len(first)} records (--rouge-limit) has a "
                                f"reference response to score ROUGE-L against")
    except DataError as exc:
        raise ValueError(f"--eval-data: {exc}") from None


def failed_runs(cfg: SweepConfig) -> list[str]:
    """Names of the grid's runs whose result is not ok (after `run_sweep`)."""
    return [run["name"] for run in expand_grid(cfg) if _status(_run_dir(cfg, run["name"])) != "ok"]


def _execute(cfg: SweepConfig, pending: list[dict[str, Any]], log, slots=None) -> None:
    """Run `pending`, one child process per free device slot (`device_slots`). On SIGINT/SIGTERM no
    run starts, the running ones get the signal from the sweep (they stop after their step with a
    checkpoint) and, once they have, `Interrupted` says how to continue. Each child runs in its own
    session, so that a terminal's Ctrl-C reaches it once, from here, not also directly."""
    slots = slots or device_slots(cfg.devices)
    devices = [slot[0] for slot in slots]
    slot_of = {slot[0]: slot for slot in slots}
    queue = list(pending)
    active: list[tuple[subprocess.Popen, dict[str, Any], str | None, float]] = []
    done = finished = interrupted = 0
    stop = StopRequest("amid sweep: stopping; the running runs save a checkpoint (Ctrl-C again to stop them at once)")
    passed_on = False
    try:
        stop.install()
        while queue or active:
            if stop.requested and not passed_on:
                queue.clear()
                for proc, *_ in active:
                    proc.send_signal(stop.signum)
                passed_on = True
            free = [d for d in devices if d not in {a[2] for a in active}]
            while queue and free:
                run, device = queue.pop(0), free.pop(0)
                d = _run_dir(cfg, run["name"])
                _, changes, train_device = slot_of[device]
                args = [sys.executable, "-m", "amid.sweep", "--run", str(d)]
                with open(d / "log.txt", "w") as log_file:  # the child keeps its own descriptor
                    proc = subprocess.Popen([*args, "--device", train_device] if train_device else args,
                                            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **changes},
                                            start_new_session=True)
                active.append((proc, run, device, time.time()))
            time.sleep(0.2)
            for item in list(active):
                proc, run, device, started = item
                if proc.poll() is None:
                    continue
                active.remove(item)
                done += 1
                d = _run_dir(cfg, run["name"])
                tail = (d / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                if stop.requested and proc.returncode in STOPPED:
                    interrupted += 1  # no result: the next sweep resumes it from its checkpoint
                    # The run's own line ends "continue with the same command and --resume": that is
                    # amid train's advice; here rerunning the sweep is (said once, at the end).
                    said = tail[0].split("; continue with")[0]
                    log(f"  [{done}/{len(pending)}] {run['name']}: stopped ({said[:300]})")
                elif proc.returncode != 0 or not (d / "result.json").exists():
                    # Killed by a signal, the log's last line is whatever the run printed before (a progress bar).
                    error = _killed(proc.returncode) if proc.returncode < 0 else tail[0]
                    write_json_atomic(d / "result.json", {"status": "failed", "error": error[:500]})
                    log(f"  [{done}/{len(pending)}] {run['name']}: FAILED ({error[:300]}); see {d / 'log.txt'}")
                else:
                    finished += 1
                    r = json.loads((d / "result.json").read_text())
                    log(f"  [{done}/{len(pending)}] {run['name']}: eval_kl {_num(r.get('eval_kl'), '.4f')}  "
                        f"eval_ppl {_num(r.get('eval_ppl'), '.2f')}  ({time.time() - started:.0f} s)")
    except KeyboardInterrupt:  # a second Ctrl-C: the runs stop at once, keeping their last checkpoints
        for proc, *_ in active:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, *_ in active:
            proc.wait()
        raise Interrupted(f"{cfg.out}: stopped at once; finished runs are kept and the others resume from their "
                          f"last checkpoints: rerun the same command to continue") from None
    finally:
        stop.restore()
    if stop.requested:
        raise Interrupted(f"{cfg.out}: {signal_name(stop.signum)}: {finished} of {len(pending)} runs finished this "
                          f"time ({interrupted} stopped with their checkpoints): rerun the same command to continue",
                          stop.signum)


def _killed(returncode: int) -> str:
    """What a child's negative exit status says: the signal that ended it."""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-returncode}"
    return f"killed by signal {-returncode} ({name}{'; out of memory?' if -returncode == signal.SIGKILL else ''})"


def _report(cfg: SweepConfig, runs: list[dict[str, Any]], log) -> str:
    from amid.losses import PRESETS, LossConfig

    defaults = {f.name: f.default for f in dataclasses.fields(LossConfig)}
    out = Path(cfg.out)
    rows = []
    for run in runs:
        d = _run_dir(cfg, run["name"])
        res = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else {"status": "missing"}
        # Plain lookups, not LossConfig(...): a run with invalid settings must still get its row.
        loss = {**defaults, **PRESETS.get(run["preset"], {}), **run["loss"]}
        rows.append({"run": run["name"], "preset": run["preset"],
                     "alpha": loss["alpha"] if run["preset"] not in ALPHA_FREE else "",
                     "lam": loss["lam"], "divergence": loss["divergence"], "order": loss["order"], **res})
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in RESULT_FIELDS})
    table = _markdown(rows)
    cost = _cost_summary(cfg, rows)
    (out / "results.md").write_text(table + "\n\n" + cost + "\n")
    plot = _plot(rows, out / "sweep.png")
    log(cost)
    if plot:
        log(f"plot: {plot}")
    return table


def _num(x: Any, fmt: str) -> str:
    if not isinstance(x, (int, float)):
        return "—"
    return format(x, ".3e" if fmt.endswith("f") and abs(x) >= 1e6 else fmt)  # a diverged run's ppl: e^700


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | preset | α | λ | D | order | held-out KL | held-out ppl | test ppl | ROUGE-L | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['preset']} | {r['alpha']} | {r['lam']:g} | {r['divergence']} | {r['order']} | "
            f"{_num(r.get('eval_kl'), '.4f')} | {_num(r.get('eval_ppl'), '.2f')} | {_num(r.get('test_ppl'), '.2f')} | "
            f"{_num(r.get('rougeL'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def _cost_summary(cfg: SweepConfig, rows: list[dict[str, Any]]) -> str:
    from amid.cache import open_cache

    m = open_cache(cfg.cache, verify=False).manifest
    cached = m["counts"]["positions"]
    trained = sum(r.get("train_tokens") or 0 for r in rows if r.get("status") == "ok")
    n_ok = sum(r.get("status") == "ok" for r in rows)
    return (f"Cost: the teacher scored {cached:,} target positions once for the cache; an online-teacher sweep "
            f"would have run it on {trained:,} target positions over {n_ok} runs "
            f"({trained / max(cached, 1):.1f}× the cache's teacher work).")


def _plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    # α = ±∞ (the limits of the α-mixture) sit a step beyond the finite αs, their ticks labelled −∞ and ∞.
    finite = sorted({r["alpha"] for r in ok if r["alpha"] != "" and math.isfinite(r["alpha"])}) or [0.0]
    step = max((finite[-1] - finite[0]) / 4, 1.0)
    at = {-math.inf: finite[0] - step, math.inf: finite[-1] + step}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "eval_kl", "held-out KL(teacher ‖ student)"), (axes[1], "eval_ppl", "held-out perplexity")):
        curves: dict[str, list[tuple[float, float]]] = {}
        for r in ok:
            if r["alpha"] != "" and r.get(key) is not None:
                curves.setdefault(f"{r['preset']} λ={r['lam']:g} {r['divergence']}/{r['order']}", []).append(
                    (at.get(r["alpha"], r["alpha"]), r[key]))
        for i, (name, pts) in enumerate(curves.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i % 10}", label=name)
        flat = [x for x in ok if x["alpha"] == "" and x.get(key) is not None]
        for i, r in enumerate(flat, start=len(curves)):  # colours after the curves', not shared with them
            ax.axhline(r[key], linestyle="--", color=f"C{i % 10}", label=r["preset"])
        used = sorted({p[0] for pts in curves.values() for p in pts})
        if any(x in used for x in at.values()):
            names = {v: ("−∞" if k < 0 else "∞") for k, v in at.items()}
            ax.set_xticks(used, [names.get(x, f"{x:g}") for x in used])
        ax.set_xlabel("α")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("amid sweep: one teacher cache, many students")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="internal: run one sweep run (used by run_sweep)")
    ap.add_argument("--run", required=True)
    ap.add_argument("--device", default=None, help="this run's --devices slot: cpu or cuda")
    args = ap.parse_args()
    try:
        run_one(Path(args.run), args.device)
    except Interrupted as exc:  # the parent sweep reads this line and the exit status
        print(f"Stopped: {exc}", flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("Stopped: interrupted before or after training (the run's checkpoint, if any, is kept)", flush=True)
        sys.exit(128 + signal.SIGINT)
