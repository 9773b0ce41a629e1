"""``spa.torch.prune``: plan on the exported ONNX graph, slice the module's own tensors.

1. Export the module (dynamo, parameter names kept; :mod:`spa.torch.export`).
2. Load, map every constant to its parameter (:mod:`spa.torch.params`); constants with no
   parameter behind them freeze what they touch, with the reason.
3. Analyse, score (gradient criteria get saliencies from the module itself), allocate: the same
   plan ``spa prune`` would make. Apply it to the ONNX model as ``spa prune`` does (compensation,
   rewrite, validation).
4. Write the pruned constants back into the parameters and fix the layers' attributes, first on
   a copy: the copy's outputs must equal the pruned ONNX model's. Only then is the user's module
   changed, in place.

If the copy disagrees only because attention heads were removed (a ``forward`` that hard-codes
its width, e.g. ``reshape(B, N, C)`` with ``C`` the input width, or ``nn.MultiheadAttention``,
whose inner width must equal ``embed_dim``), the plan is made again with heads kept, and the
report says so. Any other disagreement is an error, and the module is left untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import onnx
import torch

from spa import api, pipeline
from spa import validate as val
from spa.coupling.analysis import GroupKind
from spa.errors import ValidationError
from spa.ir.load import load_model
from spa.ir.save import save_model
from spa.options import replace_checked
from spa.plan import Plan
from spa.torch.export import eval_mode, export
from spa.torch.modules import conv_groups, fix_attributes, write_back
from spa.torch.params import ParamMap
from spa.torch.saliency import on_constants, saliency

if TYPE_CHECKING:
    from torch import nn

    from spa.torch.saliency import Batch, LossFn

log = logging.getLogger(__name__)
Inputs: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Disagreement:
    """Why a pruned copy of the module did not match the pruned ONNX model."""

    why: str
    heads_removed: bool


@dataclass
class TorchPruneReport:
    """What ``spa.torch.prune`` did: the ONNX-side report, the plan, and the torch check."""

    onnx: api.PruneReport
    plan: Plan
    params_before: int
    params_after: int
    max_abs_diff: float  # pruned module vs pruned ONNX model, on the example inputs
    relative_diff: float
    tensors_changed: int
    notes: list[str] = field(default_factory=list)

    @property
    def flops_before(self) -> int:
        return self.onnx.flops_before

    @property
    def flops_after(self) -> int:
        return self.onnx.flops_after


def prune(module: nn.Module, example_inputs: Inputs, *, options: api.PruneOptions | None = None,
          batch: Batch | None = None, loss_fn: LossFn | None = None, opset: int | None = None,
          output: str | Path | None = None, rtol: float = 1e-3, **option_values
          ) -> tuple[nn.Module, TorchPruneReport]:
    """Prune ``module`` in place; returns it with a report.

    Options are those of ``spa prune`` (:class:`spa.api.PruneOptions`), given as an object or as
    keywords (``ratio=0.5, target="flops", criterion="obspa"``). Gradient criteria (taylor, snip,
    grasp, crop) take ``batch=(inputs, targets)`` and ``loss_fn(output, targets)`` (default:
    cross-entropy of the first output). ``output``: also write the pruned ONNX model there.
    """
    options = _options(options, option_values)
    inputs = _as_tuple(example_inputs)
    params_before = _count(module)
    with tempfile.TemporaryDirectory(prefix="spa-torch-") as tmp:
        exported = export(module, inputs, Path(tmp) / "model.onnx", opset=opset)
        outcome = _attempt(module, inputs, exported, options, None, batch, loss_fn, rtol)
        if isinstance(outcome, Disagreement) and outcome.heads_removed:
            options = dataclasses.replace(options, heads_ratio=0.0)
            note = (f"attention heads kept: with heads removed the module disagreed with the "
                    f"pruned ONNX model ({outcome.why}); its forward likely hard-codes the "
                    "attention width")
            log.warning(note)
            outcome = _attempt(module, inputs, exported, options, None, batch, loss_fn, rtol)
            if isinstance(outcome, TorchPruneReport):
                outcome.notes.append(note)
        return _finish(module, outcome, params_before, output)


def apply(module: nn.Module, example_inputs: Inputs, plan: Plan | str | Path, *,
          opset: int | None = None, output: str | Path | None = None, rtol: float = 1e-3
          ) -> tuple[nn.Module, TorchPruneReport]:
    """Replay a saved plan (``report.plan.save(path)``) on a freshly built module, e.g. to load
    a pruned ``state_dict`` into it."""
    the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    inputs = _as_tuple(example_inputs)
    params_before = _count(module)
    with tempfile.TemporaryDirectory(prefix="spa-torch-") as tmp:
        exported = export(module, inputs, Path(tmp) / "model.onnx", opset=opset)
        outcome = _attempt(module, inputs, exported, None, the_plan, None, None, rtol)
        return _finish(module, outcome, params_before, output)


def _finish(module: nn.Module, outcome: TorchPruneReport | Disagreement, params_before: int,
            output: str | Path | None) -> tuple[nn.Module, TorchPruneReport]:
    if isinstance(outcome, Disagreement):
        raise ValidationError(f"the pruned module disagrees with the pruned ONNX model "
                              f"({outcome.why}); the module is unchanged")
    if output is not None:
        pruned = Path(outcome.onnx.output)
        outcome.onnx.output = str(save_model(onnx.load(str(pruned)), output))
    outcome.params_before, outcome.params_after = params_before, _count(module)
    return module, outcome


def _attempt(module: nn.Module, inputs: tuple[torch.Tensor, ...], exported: Path,
             options: api.PruneOptions | None, the_plan: Plan | None, batch: Batch | None,
             loss_fn: LossFn | None, rtol: float) -> TorchPruneReport | Disagreement:
    """One plan-apply-check round. Returns the report, or why the pruned copy disagreed."""
    loaded = load_model(exported)
    params = ParamMap.build(module, onnx.load(str(exported), load_external_data=False),
                            loaded.graph)
    recipe = the_plan.recipe if the_plan is not None else None
    ignore = options.ignore if options is not None else recipe.ignore if recipe else ()
    hidden = (options.hidden_ratio is not None if options is not None
              else recipe is not None and recipe.hidden)
    analysis = pipeline.analyse(loaded, ignore=ignore, hidden=hidden,
                                frozen_tensors=params.unmapped)
    statistics = None
    if the_plan is None:
        assert options is not None  # a plan, or the options to make one
        planned = pipeline.make_plan(
            analysis, options,
            saliency=lambda needs: on_constants(saliency(module, batch, needs, loss_fn), params))
        the_plan, statistics = planned.plan, planned.statistics
    pruned_path = exported.with_name("pruned.onnx")
    report = pipeline.emit(analysis, the_plan, pruned_path,
                           pipeline.CheckOptions(validate=True, latency=False),
                           statistics=statistics)
    pruned = onnx.load(str(pruned_path))
    groups = conv_groups(pruned, params)
    trial = copy.deepcopy(module)
    write_back(trial, params, pruned)
    fix_attributes(trial, groups)
    try:
        c = _compare(trial, inputs, pruned)
    except Exception as exc:  # the module's own forward failed on its new shapes
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return Disagreement(why, _heads_removed(analysis, the_plan))
    if not c.relative <= rtol:
        return Disagreement(f"relative difference {c.relative:.3g} > {rtol}",
                            _heads_removed(analysis, the_plan))
    changed = write_back(module, params, pruned)
    fix_attributes(module, groups)
    return TorchPruneReport(onnx=report, plan=the_plan, params_before=0, params_after=0,
                            max_abs_diff=c.max_abs, relative_diff=c.relative,
                            tensors_changed=changed)


def _compare(module: nn.Module, inputs: tuple[torch.Tensor, ...], pruned: onnx.ModelProto
             ) -> val.Closeness:
    sess = val.session(pruned)
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    expected = val.run(sess, feeds)
    with eval_mode(module), torch.no_grad():
        got = _flatten(module(*inputs))
    if len(got) != len(expected):
        raise ValidationError(f"the module returned {len(got)} tensors, the ONNX model "
                              f"{len(expected)}")
    return val.closeness(expected, dict(zip(expected, got)))


def _flatten(output: object) -> list[np.ndarray]:
    if isinstance(output, torch.Tensor):
        return [output.detach().cpu().numpy()]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [a for o in output for a in _flatten(o)]
    return []


def _heads_removed(analysis, the_plan: Plan) -> bool:
    kinds = {g.id: g.kind for g in analysis.groups}
    return any(kinds.get(g.id) is GroupKind.HEADS and g.removed for g in the_plan.groups)


def _options(options: api.PruneOptions | None, values: dict) -> api.PruneOptions:
    """``options`` with the keywords given (field names of :class:`spa.api.PruneOptions`;
    enum fields take members or their values)."""
    return replace_checked(options or api.PruneOptions(), values)


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
