"""Logits at target rows out of a Hugging Face causal LM, without [B, T, V] logits where the model allows.

`Head` is the student's route (gradients flow, the model's dtype); `TargetLogits` the teacher's
(no gradients, float32 LM head, chunked). Both rely on one check: a model whose logits are
`lm_head(base_model(x))` ("plain") can be split at the head; a model that transforms the head's
output (Gemma 2's soft-cap, logit scaling) cannot, and its own logits are used.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from amid.errors import OUT_OF_MEMORY

__all__ = ["Head", "TargetLogits", "context_length", "LOGIT_CHUNK_ELEMENTS"]

# Logits (rows × vocabulary) held at once where a model's head can be applied alone: 128 MiB of
# float32. The trainer's evaluation and `amid eval`'s perplexity take their chunks this size.
LOGIT_CHUNK_ELEMENTS = 1 << 25


def context_length(model) -> int | None:
    """The longest sequence the model's positions allow, or None where its config does not say."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


class Head:
    """How a model turns a batch into logits (or hidden states) at the target rows.

    With a plain LM head (logits = head(last hidden state), checked numerically once) only the
    target rows go through the head, and the fused loss can skip the logits altogether.
    Otherwise (soft-capping, logit scaling, ...) the model's own logits are gathered.

    A batch here is a dict with `input_ids` / `attention_mask` [B, T] and `rows` [N] (b·T + t).
    """

    def __init__(self, model):
        self.model = model
        self.head = model.get_output_embeddings()
        self.base = getattr(model, "base_model", model)
        self.plain = self.base is not model and self.head is not None and self._head_is_plain()

    @torch.no_grad()
    def _head_is_plain(self) -> bool:
        was_training = self.model.training
        self.model.eval()
        try:
            v = self.head.weight.shape[0]
            ids = (torch.arange(12, device=self.head.weight.device) * 37 % v)[None]
            full = self.model(input_ids=ids, use_cache=False).logits.float()
            hidden = self.base(input_ids=ids, use_cache=False).last_hidden_state
            mine = self.head(hidden.to(self.head.weight.device)).float()  # a spread model's last layer may sit elsewhere
            return mine.shape == full.shape and torch.allclose(mine.to(full.device), full, rtol=1e-3, atol=1e-4)
        except OUT_OF_MEMORY:  # not a property of the model: the caller must hear of it
            raise
        except Exception:  # any model whose base/head split does not work: use its logits
            return False
        finally:
            self.model.train(was_training)

    @property
    def linear(self) -> bool:
        return self.plain and isinstance(self.head, torch.nn.Linear)

    def hidden(self, batch: dict[str, Any]) -> torch.Tensor:
        """[N, H] last hidden states at the target rows (plain heads only)."""
        out = self.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        h = out.last_hidden_state  # on the last layer's device where a device map spreads the model
        return h.reshape(-1, h.shape[-1])[batch["rows"].to(h.device)]

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """[N, V] logits at the target rows."""
        if self.plain:
            return self.head(self.hidden(batch))
        return self._model_logits(batch)

    def logit_chunks(self, batch: dict[str, Any], rows_per_chunk: int) -> Iterator[torch.Tensor]:
        """[r, V] logits of the target rows, in order, rows_per_chunk at a time: with a plain head
        only one chunk of logits exists at once (the hidden states are computed once); other
        models compute all [B·T, V] logits and are only sliced."""
        if self.plain:
            hidden = self.hidden(batch)
            for i in range(0, hidden.shape[0], rows_per_chunk):
                yield self.head(hidden[i: i + rows_per_chunk])
        else:
            rows = self._model_logits(batch)
            for i in range(0, rows.shape[0], rows_per_chunk):
                yield rows[i: i + rows_per_chunk]

    def _model_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        z = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return z.reshape(-1, z.shape[-1])[batch["rows"]]


class TargetLogits:
    """A teacher's float32 logits at the target rows, a chunk of rows at a time.

    The model's body runs in its own dtype and a plain linear LM head is applied in float32 to
    the target rows only: a bf16/fp16 teacher's logits are not rounded to its dtype's 8/11
    significant bits before the softmax, and no [B, T, V] logits tensor is built. Any other
    model's own logits (in its dtype) are used. `mode` says which: "float32 head" or "model".
    The plain-head check is `Head`'s, made once when this is built (a 12-token probe).

    The float32 matmul follows the process's TF32 setting (PyTorch's default: off, exact); it is
    not changed here, since flipping that global flag would leak into the caller's code.
    """

    def __init__(self, model):
        self.route = Head(model)
        self.mode = "float32 head" if self.route.linear else "model"
        if self.route.linear:
            head = self.route.head
            self.weight = head.weight.float()  # a copy only when the model is not float32
            self.bias = None if head.bias is None else head.bias.float()

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # float32 even inside a training autocast
            return torch.nn.functional.linear(hidden.to(self.weight.device, torch.float32), self.weight, self.bias)

    @torch.no_grad()
    def chunks(self, batch: dict[str, Any], rows_per_chunk: int) -> Iterator[torch.Tensor]:
        """[r, V] float32 logits of the batch's target rows, in order, rows_per_chunk at a time."""
        if self.mode == "model":
            for z in self.route.logit_chunks(batch, rows_per_chunk):
                yield z.float()
        else:
            hidden = self.route.hidden(batch)
            for i in range(0, hidden.shape[0], rows_per_chunk):
                yield self._head(hidden[i: i + rows_per_chunk])
