"""The ``config.json`` of a folder pruned together (spa/pipeline/family.py), for its pruned caches.

A ``config.json`` (🤗 Transformers' model config) that states the key/value head count the
pruned caches no longer have (``num_key_value_heads``: Optimum's ``ORTModelForCausalLM`` sizes
the first step's caches from it) is written with their count (:func:`config_edits`). Where
the config cannot describe them (:func:`spa.generation.placeholder_count`: a runtime that sizes
the first step's caches by ``num_attention_heads``), the decoder's pruned cache inputs declare
their head axis symbolic instead, so that it takes the placeholder caches a runtime makes
(:func:`placeholder_caches`, :func:`symbolic_heads`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa import validate as val
from spa.errors import ValidationError
from spa.generation import config_edit, decoder_feeds, placeholder_count
from spa.pipeline.merged import axis_name

if TYPE_CHECKING:
    from spa.generation import SignatureChange
    from spa.pipeline import CheckOptions


def config_edits(config: dict, changes: Mapping[str, SignatureChange]) -> dict[str, int]:
    """What to set in the folder's ``config.json`` for the pruned caches (🤗 Optimum's
    ``ORTModelForCausalLM`` sizes the first step's from its key/value head count); nothing when
    the files would need different values."""
    edits: dict[str, set[int]] = {}
    for change in changes.values():
        for k, v in config_edit(config, change).items():
            edits.setdefault(k, set()).add(v)
    return {k: vs.pop() for k, vs in edits.items() if len(vs) == 1}


Cache = tuple[int, int]  # a pruned cache input's head axis, and the heads it keeps


def placeholder_caches(config: dict, changes: Mapping[str, SignatureChange]
                       ) -> dict[str, tuple[int, dict[str, Cache]]]:
    """Per file whose pruned caches the folder's config cannot describe
    (:func:`spa.generation.placeholder_count`): the head count of the placeholder caches a
    runtime feeds its first step, and its pruned cache inputs."""
    out = {}
    for n, change in changes.items():
        count = placeholder_count(config, change)
        if count is not None:
            out[n] = (count, {name: (axis, len(kept)) for name, (axis, kept, _)
                              in change.inputs.items() if name in change.caches})
    return out


def symbolic_heads(path: Path, count: int, caches: Mapping[str, Cache],
                   checks: CheckOptions) -> dict:
    """Declare the head axis of the pruned cache inputs of the decoder at ``path`` symbolic, so
    that the first step takes the placeholder caches a runtime sizes from the config (``count``
    heads, length 0: 🤗 Optimum's ``ORTModelForCausalLM`` for GPT-2, Phi-3 and the others it
    sizes by ``num_attention_heads``). Checked: one token decoded on such placeholders gives
    the logits it gives on empty caches of the kept head counts."""
    model = onnx.load(str(path), load_external_data=False)
    for v in model.graph.input:
        if v.name in caches:
            axis = caches[v.name][0]
            v.type.tensor_type.shape.dim[axis].dim_param = axis_name(v.name, axis)
    onnx.save(model, str(path))
    done: dict = {"placeholder_heads": count, "inputs": len(caches)}
    if not checks.validate:
        return done
    sess = val.session(str(path), what=path.name)
    feeds = decoder_feeds(val.random_inputs(sess, dims={}))  # one token, batch 1
    declared = {i.name: i.shape for i in sess.get_inputs()}

    def empty(name: str, heads: int) -> np.ndarray:
        axis = caches[name][0]
        shape = [heads if a == axis else 0 if isinstance(d, str) and a > 0 else s
                 for a, (d, s) in enumerate(zip(declared[name], feeds[name].shape))]
        return np.zeros(shape, feeds[name].dtype)

    try:
        own = val.run(sess, feeds | {k: empty(k, c[1]) for k, c in caches.items()})["logits"]
    except (ValidationError, KeyError) as exc:
        done["check"] = f"not run: {str(exc).splitlines()[0]}"
        return done
    given = val.run(sess, feeds | {k: empty(k, count) for k in caches})["logits"]
    diff = float(np.abs(given - own).max() / max(float(np.abs(own).max()), 1e-30))
    if not diff <= checks.rtol:
        raise ValidationError(f"{path.name}: fed placeholder caches of {count} heads, the first "
                              f"step answers {diff:.1e} (relative) apart from empty caches of "
                              "the heads it keeps")
    done["check"] = diff
    return done


__all__ = ["Cache", "config_edits", "placeholder_caches", "symbolic_heads"]
