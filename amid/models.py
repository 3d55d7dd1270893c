"""A Hugging Face causal LM and its tokenizer, by hub name or local directory, for every command.

One place turns what transformers raises for a bad directory (a safetensors file cut short, no
tokenizer files, the config of another kind of model) into one line naming the model and what
to do, and refuses a checkpoint that lacks weights the model needs: transformers fills them with
random values and only logs it (a bare `LlamaModel` saved without its LM head loads as a causal
LM with a random head), so a teacher would be cached, or a student trained, from noise.
"""

from __future__ import annotations

import json
from pathlib import Path

from amid.errors import first_line

__all__ = ["ModelError", "check_model_name", "resolve_model", "model_context", "model_source", "load_tokenizer",
           "load_model"]

# Files one of which a saved tokenizer has (fast, SentencePiece, BPE or WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


class ModelError(ValueError):
    """A model or tokenizer that cannot be used as given; the message names it and what to do."""


def check_model_name(name: str, what: str) -> None:
    """ModelError for a local-looking model path that does not exist, or one starting with "~"
    (which transformers does not expand): transformers would take it for a hub name and fail
    with an unrelated message, after a minute of retries offline. Local-looking: "./x", "../x",
    "/x", more than one "/" (a hub name is "name" or "owner/name"), or a first part that is a
    directory here ("runs/typo" beside runs/). Other names are left to transformers."""
    if name.startswith("~"):
        raise ModelError(f"{what} {name}: '~' is not expanded here; pass {Path(name).expanduser()}")
    path = Path(name)
    if path.is_dir():
        return
    parts = name.replace("\\", "/").split("/")
    local_first = len(parts) == 2 and Path(parts[0]).is_dir() and not _holds_models(Path(parts[0]))
    if name.startswith(("./", "../", "/", ".\\")) or len(parts) > 2 or local_first:
        if path.exists():
            raise ModelError(f"{what} {name}: a file, not a model directory")
        raise ModelError(f"{what} {name}: no such local model directory"
                         + (f" ({parts[0]}/ exists here and holds no models, so this is not taken for a hub name)"
                            if local_first else ""))


def _holds_models(folder: Path, look: int = 200) -> bool:
    # A folder of model directories ("Qwen/" after a download to Qwen/Qwen2-1.5B): "Qwen/other"
    # may then still be a hub name. Runs, sweeps and data hold none.
    try:
        return any(_is_model_config(child / "config.json") for _, child in zip(range(look), folder.iterdir()))
    except OSError:
        return False


def resolve_model(name: str) -> str:
    """The model an amid run directory holds: its final/, or its checkpoint/ where that is newer
    (none yet, or a finished run resumed for more steps); any other name (a model directory: its
    config.json names a model_type) as it is."""
    path = Path(name)
    if not path.is_dir() or _is_model_config(path / "config.json"):
        return name
    found = [path / sub for sub in ("final", "checkpoint") if _is_model_config(path / sub / "config.json")]
    if not found:
        return name
    return str(max(found, key=lambda d: _weights_mtime(d)))  # max keeps final/ on a tie


def _weights_mtime(model_dir: Path) -> float:
    return max((f.stat().st_mtime for f in model_dir.glob("*.safetensors")), default=0.0)


def model_context(name: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence a model takes, from its config alone (no weights loaded; a run
    directory: its model's), or None where the config does not say or cannot be read (loading
    the model says why)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from amid.heads import context_length

    try:
        config = AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    except Exception:
        return None
    return context_length(SimpleNamespace(config=config))


def _is_model_config(path: Path) -> bool:
    try:
        return "model_type" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def model_source(name: str, what: str, need: str) -> str:
    """What to hand transformers for `name` (`resolve_model`), once it is neither a missing local
    path nor a directory transformers cannot use (named for what it is, not by a library message).
    `need`: "model" (a config.json must be there) or "tokenizer" (tokenizer files)."""
    check_model_name(name, what)
    name = resolve_model(name)
    path = Path(name)
    if not path.is_dir():  # a hub name
        return name
    if (path / "manifest.json").is_file() and (path / "examples").is_dir():
        raise ModelError(f"{what} {name}: an amid cache, not a model (a cache goes to --cache)")
    if (path / "metrics.jsonl").is_file() and not _is_model_config(path / "config.json"):
        raise ModelError(f"{what} {name}: an amid run directory with no final/ or checkpoint/ yet: nothing to load")
    if need == "tokenizer" and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{what} {name}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); save the "
                         f"tokenizer beside the model (tokenizer.save_pretrained({name!r}))")
    if need == "model" and not (path / "config.json").is_file():
        raise ModelError(f"{what} {name}: no config.json; not a saved transformers model (model.save_pretrained)")
    return name


def load_tokenizer(name: str, what: str, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained(name) (a run directory: its model's, `resolve_model`), or a
    ModelError naming `what` (e.g. "--student")."""
    from transformers import AutoTokenizer

    name = model_source(name, what, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, ...: what transformers raises varies by what is missing
        raise ModelError(f"{what} {name}: its tokenizer cannot be loaded ({first_line(exc)})") from None


def load_model(name: str, what: str, trust_remote_code: bool = False, **kwargs):
    """AutoModelForCausalLM.from_pretrained(name, **kwargs) (a run directory: its model's,
    `resolve_model`) with every weight from the checkpoint, or a ModelError naming `what`: a
    directory that cannot be loaded, or weights it lacks."""
    from transformers import AutoModelForCausalLM

    name = model_source(name, what, "model")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                           output_loading_info=True, **kwargs)
    except Exception as exc:  # safetensors, config and hub errors vary by the damage
        raise ModelError(f"{what} {name}: cannot be loaded as a causal language model ({first_line(exc)})") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(f"{what} {name}: its weights lack {', '.join(missing[:3])}"
                         f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} (a base model saved "
                         f"without its LM head?); transformers would fill them with random values")
    return model
