"""A Hugging Face causal LM and its tokenizer, by hub name or local directory, for every command.

One place turns what transformers raises for a bad directory (a safetensors file cut short, no
tokenizer files, the config of another kind of model) into one line naming the model and what
to do, and refuses a checkpoint that lacks weights the model needs: transformers fills them with
random values and only logs it (a bare `LlamaModel` saved without its LM head loads as a causal
LM with a random head), so a teacher would be cached, or a student trained, from noise.
"""

from __future__ import annotations

from pathlib import Path

from amid.errors import first_line

__all__ = ["ModelError", "check_model_name", "load_tokenizer", "load_model"]


class ModelError(ValueError):
    """A model or tokenizer that cannot be used as given; the message names it and what to do."""


def check_model_name(name: str, what: str) -> None:
    """ModelError for a local-looking model path that does not exist ("./x", "../x", "/x"), or
    one starting with "~" (which transformers does not expand): transformers would take it for
    a hub name and fail with an unrelated message. Other names ("gpt2", "owner/name") may be hub
    names and are left to transformers."""
    if name.startswith("~"):
        raise ModelError(f"{what} {name}: '~' is not expanded here; pass {Path(name).expanduser()}")
    if name.startswith(("./", "../", "/", ".\\")) and not Path(name).is_dir():
        raise ModelError(f"{what} {name}: no such local model directory")


def load_tokenizer(name: str, what: str, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained(name), or a ModelError naming `what` (e.g. "--student")."""
    from transformers import AutoTokenizer

    check_model_name(name, what)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, ...: what transformers raises varies by what is missing
        raise ModelError(f"{what} {name}: its tokenizer cannot be loaded ({first_line(exc)})") from None


def load_model(name: str, what: str, trust_remote_code: bool = False, **kwargs):
    """AutoModelForCausalLM.from_pretrained(name, **kwargs) with every weight from the checkpoint,
    or a ModelError naming `what`: a directory that cannot be loaded, or weights it lacks."""
    from transformers import AutoModelForCausalLM

    check_model_name(name, what)
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
