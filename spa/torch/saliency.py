"""Per-weight saliencies from one batch, for the gradient criteria (passes/importance/gradient).

``w·g`` (taylor, snip) needs one backward pass; ``w·Hg`` (grasp, crop) a second one through the
first (double backward): ``Hg = ∂/∂w (g · stop_grad(g))``. The module runs in the mode it is in
(train mode for prune-at-init, so BatchNorm uses batch statistics as training will), and its
parameters' ``.grad`` are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from spa.errors import OptionError

if TYPE_CHECKING:
    from spa.torch.params import ParamMap

Batch = tuple[Sequence[torch.Tensor] | torch.Tensor, torch.Tensor]
LossFn = Callable[[object, torch.Tensor], torch.Tensor]


def default_loss(output: object, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the first output against integer class targets."""
    logits = first_tensor(output)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    raise OptionError(f"the module returned {type(output).__name__}, not a tensor to take a "
                      "loss of; pass loss_fn=")


def saliency(module: nn.Module, batch: Batch | None, needs: str, loss_fn: LossFn | None = None,
             chunk: int | None = None) -> dict[str, np.ndarray]:
    """``{parameter name: w·g or w·Hg}`` for every parameter that requires grad.

    ``chunk``: run the batch in pieces of this many samples (a graph exported with a fixed
    batch size); gradients and Hessian-gradient products are averaged over the pieces, which
    gives the full batch's ``g`` and ``H g`` for a mean loss.
    """
    if batch is None:
        raise OptionError("gradient criteria need one batch: batch=(inputs, targets)")
    inputs, target = batch
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    n = len(target)
    step = chunk or n
    pieces = [(tuple(t[i:i + step] for t in inputs), target[i:i + step])
              for i in range(0, n, step)]

    def grads_of(piece, create_graph: bool):
        loss = (loss_fn or default_loss)(module(*piece[0]), piece[1])
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise OptionError("the loss is not a differentiable scalar: this model cannot be "
                              "differentiated here; use a data-free criterion (l1, l2, fpgm, "
                              "obspa)")
        return torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)

    g = _mean([grads_of(p, False) for p in pieces])
    if needs == "whg":
        hg = []
        for piece in pieces:
            gi = grads_of(piece, True)
            flow = sum((a * b.detach()).sum() for a, b in zip(gi, g)
                       if a is not None and b is not None)
            hg.append(torch.autograd.grad(flow, params, allow_unused=True))
        g = _mean(hg)
    return {name: (p.detach() * v).double().cpu().numpy()
            for (name, p), v in zip(named, g) if v is not None}


def _mean(per_piece: list[tuple]) -> list:
    out = []
    for parts in zip(*per_piece):
        present = [t for t in parts if t is not None]
        out.append(sum(present) / len(parts) if present else None)
    return out


def on_constants(per_param: dict[str, np.ndarray], params: ParamMap) -> dict[str, np.ndarray]:
    """The same saliencies laid out like the ONNX constants the analysis scores."""
    return {const: origin.to_constant(per_param[origin.param])
            for const, origin in params.origins.items() if origin.param in per_param}


def onnx_saliency(model: onnx.ModelProto, calib: dict[str, np.ndarray], needs: str,
                  tokenizer: str | None = None) -> dict[str, np.ndarray]:
    """Saliencies of an ONNX model's constants, keyed by constant name: the model runs in
    PyTorch (:func:`spa.torch.from_onnx`) on ``calib``'s inputs against ``calib["labels"]``;
    or, for a language model's token prompts (a text file: its first output ``[N, T, vocab]``
    over the rows of the embedding ``input_ids`` indexes), against the targets it was trained
    on: a causal model's next tokens (:func:`next_tokens`), a masked LM's hidden tokens
    (:func:`masked`, behind the mask token of ``tokenizer``, the one the text was read with)."""
    from spa.torch.interpreter import OnnxModule

    if "labels" not in calib and ("input_ids" not in calib or not _predicts_tokens(model)):
        raise OptionError("gradient criteria on an ONNX file need --calib FILE.npz holding the "
                          "graph inputs and an integer 'labels' array (cross-entropy loss), or "
                          "a text file for a language model (next-token labels)")
    module = OnnxModule(model)
    missing = [n for n in module.input_names if n not in calib]
    if missing:
        raise OptionError(f"--calib has no array for the graph input(s) {', '.join(missing)}")
    inputs = {n: torch.from_numpy(np.asarray(calib[n])) for n in module.input_names}
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[:1]
    chunk = dim0[0].dim_value if dim0 and dim0[0].HasField("dim_value") else None
    if "labels" in calib:
        labels = torch.from_numpy(np.asarray(calib["labels"]).astype(np.int64))
    elif _causal(module, inputs, chunk or 1):
        labels = next_tokens(np.asarray(calib["input_ids"]), calib.get("attention_mask"))
    else:
        ids, labels = masked(np.asarray(calib["input_ids"]), calib.get("attention_mask"),
                             _mask_id(tokenizer))
        inputs["input_ids"] = torch.from_numpy(ids)
    per_param = saliency(module, (tuple(inputs.values()), labels), needs, chunk=chunk)
    names = {f"params.{key}": name for name, key in module.onnx_names().items()}
    return {names[k]: v for k, v in per_param.items() if k in names}


IGNORED = -100  # cross_entropy's ignore_index: a position without a target


def _attended(ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Which token positions of ``ids`` the attention mask attends (all, without one; the
    mask may span a past first)."""
    return np.ones(ids.shape, bool) if mask is None \
        else np.asarray(mask)[:, -ids.shape[1]:] != 0


def next_tokens(ids: np.ndarray, mask: np.ndarray | None) -> torch.Tensor:
    """Each attended token's next token, the last one and padding ignored (next-token
    cross-entropy, as a causal LM was trained)."""
    ids = ids.astype(np.int64)
    attended = _attended(ids, mask)
    labels = np.full_like(ids, IGNORED)
    follows = attended[:, :-1] & attended[:, 1:]
    labels[:, :-1] = np.where(follows, ids[:, 1:], IGNORED)
    return torch.from_numpy(labels)


def _mask_id(tokenizer: str | None) -> int:
    """The mask token of ``tokenizer``, or an error naming what to give instead."""
    from spa.calibration.text import mask_token_id

    found = mask_token_id(tokenizer) if tokenizer else None
    if found is None:
        raise OptionError(
            "the model's scores at a token depend on the tokens after it (a masked or "
            "bidirectional language model), so next-token labels do not apply, and the "
            "tokenizer has no mask token ([MASK] or <mask>) to mask tokens with; give "
            "--calib FILE.npz with the graph inputs and an integer 'labels' array "
            f"({IGNORED} where a position has no target)")
    return found


MASKED_SHARE = 0.15  # of each prompt's inner tokens, as BERT was trained


def masked(ids: np.ndarray, mask: np.ndarray | None, mask_id: int, seed: int = 0
           ) -> tuple[np.ndarray, torch.Tensor]:
    """A masked LM's inputs and targets: :data:`MASKED_SHARE` of each prompt's attended
    tokens (at least one; the first and last, a tokenizer's [CLS] and [SEP], never) replaced
    by ``mask_id`` and labelled with the token they hid, every other position ignored."""
    attended = _attended(ids, mask)
    rng = np.random.default_rng(seed)
    out, labels = ids.copy(), np.full(ids.shape, IGNORED, np.int64)
    for row in range(len(ids)):
        inner = np.flatnonzero(attended[row])[1:-1]
        if not len(inner):
            continue
        hide = rng.choice(inner, max(1, round(MASKED_SHARE * len(inner))), replace=False)
        labels[row, hide] = ids[row, hide]
        out[row, hide] = mask_id
    return out, torch.from_numpy(labels)


def _causal(module: nn.Module, inputs: dict[str, torch.Tensor], count: int) -> bool:
    """Whether the first output at each attended token ignores the tokens after it: the first
    ``count`` prompts run twice, the second time with each one's last attended token changed,
    and the scores at their earlier tokens must not move (by more than float noise). A decoder
    passes; an encoder's masked-LM head, whose every score sees the whole prompt, does not."""
    batch = {k: v[:count] for k, v in inputs.items()}
    ids = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    attended = torch.from_numpy(_attended(ids.numpy(), None if mask is None else mask.numpy()))
    if (attended.sum(1) < 2).all():
        return True  # nothing to tell by: no prompt has a token before another
    last = ids.shape[1] - 1 - attended.flip(1).int().argmax(1)
    rows = torch.arange(len(ids))
    ids[rows, last] = torch.where(ids[rows, last] > 0, ids[rows, last] - 1, 1)  # in range
    with torch.no_grad():
        before = first_tensor(module(*batch.values())).float()
        after = first_tensor(module(*{**batch, "input_ids": ids}.values())).float()
    earlier = attended & (torch.arange(ids.shape[1]) < last[:, None])
    moved = (before - after).abs()[earlier]
    return bool(moved.numel() == 0 or moved.max() <= 1e-4 * before.abs().max().clamp_min(1e-30))


def _predicts_tokens(model: onnx.ModelProto) -> bool:
    """The first output is ``[N, T, V]`` with ``V`` the rows of ``input_ids``'s embedding."""
    from spa.torch.inversion import embedding_rows

    dims = model.graph.output[0].type.tensor_type.shape.dim
    rows = embedding_rows(model, "input_ids")
    return len(dims) == 3 and rows is not None and dims[2].dim_value == rows

