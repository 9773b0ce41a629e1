"""``spa recover``: win back what pruning cost by distilling the dense model into the pruned one.

This module is the public API and the file side: it reads the two ONNX files and the
calibration data, checks that the models fit together, has :mod:`spa.torch.distill` train
(the losses, augmentation, learning-rate choice and early stopping are described there), and
writes the result.

The trained values are written into a copy of the pruned ModelProto, initializer by
initializer (no re-export); onnxruntime must load and run it with the pruned model's outputs,
and if its held-out fidelity is not better than the pruned model's, the pruned model is written
unchanged. Under ``torchrun`` (``WORLD_SIZE > 1``) process 0 makes every decision and alone
writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from spa import fidelity
from spa import validate as val
from spa.calibration import Calibration, CalibrationOptions
from spa.calibration import load as load_calibration
from spa.calibration.text import with_tokenizer
from spa.errors import ModelLoadError, OptionError, one_line
from spa.generation import cache_sizes
from spa.ir.contrib import value_dims
from spa.ir.load import load_proto
from spa.ir.save import Staging, check_output_folder, check_output_path, staged_folder, write_proto
from spa.pipeline.genai import copy_rest, decoder_file
from spa.pipeline.joined import Distil
from spa.pipeline.options import SYNTHETIC
from spa.pipeline.stages import analyse
from spa.recovery import SYNTHETIC_REFUSED, RecoverOptions
from spa.torch import control_flow
from spa.torch.distill import Distiller, Runs, World
from spa.torch.interpreter import OnnxModule, opset_of

log = logging.getLogger(__name__)

KEPT_RECOVERED = "recovered"
KEPT_START = "start: recovery made held-out fidelity worse"

Model = str | os.PathLike[str] | onnx.ModelProto


@dataclass
class RecoverReport:
    """What ``spa recover`` did: held-out fidelity before and after (onnxruntime), the
    learning rate and how it was chosen, and which model was written."""

    fidelity_before: dict[str, float]
    fidelity_after: dict[str, float]
    lr: float
    lr_trials: dict[str, dict[str, float]]  # learning rate → held-out fidelity after its trial
    steps: int
    seconds: float
    kept: str
    device: str
    world_size: int
    output: str
    measure: str = ""  # the headline measure's name (agreement or cosine)
    # learning rate → validation-run fidelity after its longer check (spa.torch.distill)
    lr_checks: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    matched_weight: float = 0.0  # of the matched intermediate values' loss; 0 when none
    # matched-value loss weight → validation-run fidelity after its check at the chosen rate
    weight_checks: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    # the samples trained on and held out (:meth:`spa.calibration.Calibration.summary`)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GraphInput:
    """A graph input as :func:`spa.calibration.load` reads it (:class:`InputSpec`)."""

    name: str
    dtype: Any  # a numpy dtype
    shape: Sequence[int | str | None] | None  # always given here


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The inputs fed at run time (initializers listed as inputs are not)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        out.append(GraphInput(i.name, helper.tensor_dtype_to_np_dtype(t.elem_type),
                              tuple(value_dims(i))))
    return out


def calibration_for(model: Model, path: str, options: CalibrationOptions | None = None, *,
                    seed: int = 0, tokenizer_from: Sequence[Model] = ()) -> Calibration:
    """``--calib PATH`` read for ``model``'s inputs, split into training and held-out samples;
    a text file without ``--tokenizer`` takes the one saved beside the first model of
    ``tokenizer_from`` (default: ``model``) that has one."""
    if path == SYNTHETIC:
        raise OptionError(f"spa recover: {SYNTHETIC_REFUSED}")
    files = [m for m in (tokenizer_from or (model,)) if isinstance(m, (str, os.PathLike))]
    options = with_tokenizer(options or CalibrationOptions(), path, *files)
    proto = _proto(model)
    return load_calibration(path, graph_inputs(proto), options, seed=seed,
                            dims=_cache_dims(proto))


def recover_folder(dense: str | os.PathLike[str], pruned: str | os.PathLike[str],
                   output: str | os.PathLike[str], calibration: Calibration,
                   options: RecoverOptions | None = None) -> RecoverReport:
    """:func:`recover` for onnxruntime-genai folders: the pruned folder's decoder distilled
    from the dense folder's into the folder ``output`` (absent or empty), the pruned folder's
    other files (its config, tokenizer) copied beside it; nothing is left behind on failure."""
    out = Path(output)
    check_output_folder(out)
    teacher, _ = decoder_file(dense)
    student, skip = decoder_file(pruned)
    with staged_folder(out) as tmp:
        report = recover(teacher, student, tmp / student.name, calibration, options)
        copy_rest(Path(pruned), tmp, skip)
    return dataclasses.replace(report, output=str(out))


def _cache_dims(model: onnx.ModelProto) -> dict[str, int]:
    """Sizes of a KV-cache decoder's symbolic cache dims as its attention ops say (a head size
    named ``kv_cache_dim``, as onnxruntime-genai's builder writes it), so that a text file's
    prompts get empty caches as ``spa prune`` made them; {} for other models."""
    if not any(len(i.type.tensor_type.shape.dim) == 4 and i.name.startswith("past")
               for i in model.graph.input):
        return {}
    return cache_sizes(analyse(load_proto(model)))


def recover(dense: Model, pruned: Model, output: str | os.PathLike[str],
            calibration: Calibration, options: RecoverOptions | None = None, *,
            validate: bool = True) -> RecoverReport:
    """Distil ``dense`` into ``pruned`` on ``calibration`` and write the result to ``output``
    (or ``pruned`` unchanged when that was more faithful on the held-out split)."""
    options = options or RecoverOptions()
    dense_proto, pruned_proto = _proto(dense), _proto(pruned)
    check_interfaces(dense_proto, pruned_proto)
    dense_proto = fed_like_student(dense_proto, pruned_proto, calibration)
    for source in (dense, pruned):
        check_output_path(output, input_path=None if isinstance(source, onnx.ModelProto)
                          else Path(source))
    if not calibration.held_out or not calibration.train:
        raise OptionError("spa recover needs training and held-out calibration samples (a "
                          "--held-out share above 0, and more samples than it holds back)")
    world = World.start(options.device)
    try:
        return _recover(dense_proto, pruned_proto, pruned, Path(output), calibration, options,
                        world, validate)
    finally:
        world.stop()


def joint_distiller(options: RecoverOptions) -> Distil:
    """``spa prune folder/ --recover``: distil an encoder and decoder joined into one graph
    (spa/pipeline/joined.py), or a folder's one trained file, as :func:`recover` distils one
    file, in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OptionError("--recover on a folder trains in one process: run it without "
                          "torchrun")
    # the joined graph's mask says which decoder logits count, and no node reads it: dropping
    # its tokens would only drop terms of the loss
    options_joined = dataclasses.replace(options, token_dropout=0.0)

    def distil(dense: onnx.ModelProto, pruned: onnx.ModelProto, calibration: Calibration,
               work: Path, *, joined: bool = True) -> tuple[onnx.ModelProto | None, dict]:
        with tempfile.TemporaryDirectory(prefix=".spa-recover-", dir=work) as tmp:
            path = Path(tmp) / "joined.onnx"
            done = recover(dense, pruned, path, calibration,
                           options_joined if joined else options)
            trained = onnx.load(str(path)) if done.kept == KEPT_RECOVERED else None
        report = done.to_dict()
        del report["output"]  # a scratch file
        return trained, report
    return distil


def check_interfaces(dense: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    """The student must take the teacher's inputs and give its outputs (names, count)."""
    for what, a, b in (("inputs", [i.name for i in graph_inputs(dense)],
                        [i.name for i in graph_inputs(pruned)]),
                       ("outputs", [o.name for o in dense.graph.output],
                        [o.name for o in pruned.graph.output])):
        if a != b:
            raise OptionError(f"the dense and pruned models have different graph {what}: "
                              f"{a} (dense) vs {b} (pruned); recover the pruned model with the "
                              "model it was pruned from")


def _fixed_axes(a: Sequence[int | str | None], b: Sequence[int | str | None]) -> list[int]:
    """The axes where two shapes have different fixed sizes (all of them if ranks differ)."""
    if len(a) != len(b):
        return list(range(max(len(a), len(b))))
    return [k for k, (x, y) in enumerate(zip(a, b))
            if isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 and x != y]


def fed_like_student(dense: onnx.ModelProto, pruned: onnx.ModelProto,
                     calibration: Calibration) -> onnx.ModelProto:
    """``dense`` taking the pruned model's inputs, so that teacher and student are fed the
    same samples. Only a decoder's KV caches that lost heads differ, and only empty ones (each
    sample a prompt, as text calibration gives) can be fed to both: the teacher makes its own
    empty caches from the student's (a slice of one head, expanded to its head count: no
    value is made up). Other differences are an :class:`OptionError` naming the input."""
    wants = {i.name: i for i in graph_inputs(dense)}
    # name -> (the axes that differ, the dense model's shape, the pruned model's)
    changed: dict[str, tuple[list[int], Sequence[int | str | None],
                             Sequence[int | str | None]]] = {}
    for given in graph_inputs(pruned):
        wanted = wants[given.name]
        axes = _fixed_axes(wanted.shape or (), given.shape or ())
        if not axes:
            continue
        if len(wanted.shape or ()) != len(given.shape or ()) or any(
                np.size(part[given.name]) != 0 for part in (calibration.train,
                                                             calibration.held_out)
                if given.name in part):
            raise OptionError(f"graph input {given.name!r} is {list(wanted.shape or ())} in the "
                              f"dense model and {list(given.shape or ())} in the pruned one: "
                              "recovery feeds both the same samples, which only an empty KV "
                              "cache (a prompt, as text calibration gives) allows")
        changed[given.name] = (axes, wanted.shape or (), given.shape or ())
    if not changed:
        return dense
    model = onnx.ModelProto()
    model.CopyFrom(dense)
    graph = model.graph
    made: list[onnx.NodeProto] = []
    for name, (axes, shape, size) in changed.items():
        own = f"{name}/dense_heads"
        for node in graph.node:
            node.input[:] = [own if x == name else x for x in node.input]
        made += [
            helper.make_node("Slice", [name, f"{own}/starts", f"{own}/ends", f"{own}/axes"],
                             [f"{own}/one"]),
            helper.make_node("Expand", [f"{own}/one", f"{own}/shape"], [own])]
        graph.initializer.extend([
            numpy_helper.from_array(np.zeros(len(axes), np.int64), f"{own}/starts"),
            numpy_helper.from_array(np.ones(len(axes), np.int64), f"{own}/ends"),
            numpy_helper.from_array(np.array(axes, np.int64), f"{own}/axes"),
            numpy_helper.from_array(np.array([shape[k] if k in axes else 1
                                              for k in range(len(shape))], np.int64),
                                    f"{own}/shape")])
        value = next(i for i in graph.input if i.name == name)
        for k in axes:
            value.type.tensor_type.shape.dim[k].dim_value = int(size[k])  # type: ignore[arg-type]
    nodes = [*made, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _proto(model: Model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model))
    except (OSError, DecodeError, ValueError) as exc:
        raise ModelLoadError(f"{model}: cannot read the ONNX model ({one_line(exc)})") from exc


def _recover(dense: onnx.ModelProto, pruned: onnx.ModelProto, pruned_source: Model,
             output: Path, calibration: Calibration, options: RecoverOptions, world: World,
             validate: bool) -> RecoverReport:
    start_time = time.monotonic()
    torch.manual_seed(options.seed)
    distiller = Distiller(dense, pruned, graph_inputs(pruned), calibration, options, world)
    # Without validation, held-out fidelity is measured here, in torch (a collective under
    # torchrun, so in every process); with it, onnxruntime measures the written models.
    start_held = None if validate else distiller.held_out_fidelity()
    steps, seconds = options.budget()
    if options.lr is not None:
        lr = options.lr
        trials, checks, weights = Runs(), Runs(), Runs()
    else:
        lr, trials, checks, weights = distiller.choose_lr(steps, seconds)
        log.info("recover: learning rate %g chosen on the validation runs", lr)
        if weights:
            log.info("recover: matched-value loss weight %g chosen on the validation runs",
                     distiller.matched_weight)
    remaining = None if seconds is None else max(seconds - (time.monotonic() - start_time), 0)
    steps_run, _ = distiller.train(lr, steps, remaining)
    torch_held = None if start_held is None else (start_held, distiller.held_out_fidelity())
    report = None
    if world.rank == 0:
        report = _write(dense, pruned, pruned_source, distiller, output, calibration,
                        torch_held)
        report = dataclasses.replace(
            report, lr=lr, lr_trials=_keyed(trials), lr_checks=_keyed(checks),
            matched_weight=distiller.matched_weight if distiller.matched else 0.0,
            weight_checks=_keyed(weights),
            steps=steps_run, seconds=round(time.monotonic() - start_time, 3),
            device=str(world.device), world_size=world.size,
            calibration=calibration.summary())
    result: RecoverReport = world.decide(report)
    return result


def _keyed(runs: Runs) -> dict[str, dict[str, float]]:
    """``runs`` keyed by the rate or weight as printed (JSON keys are strings)."""
    return {f"{k:g}": v for k, v in runs.items()}


def _write(dense: onnx.ModelProto, pruned: onnx.ModelProto, pruned_source: Model,
           distiller: Distiller, output: Path, calibration: Calibration,
           torch_held: tuple[dict[str, float], dict[str, float]] | None) -> RecoverReport:
    """Write the trained model, or the start when it is not more faithful on the held-out
    split: measured in onnxruntime (validated), or ``torch_held`` (before, after) when given
    (validation off)."""
    trained = written_back(pruned, distiller.student)
    if torch_held is None:
        _check_runs(pruned, trained, calibration.held_out, distiller.fixed or 2)
        before = fidelity.measure(dense, pruned, calibration.held_out)
        after = fidelity.measure(dense, trained, calibration.held_out)
    else:
        before, after = torch_held
    better = fidelity.better(after, before)
    with Staging(output) as stage:
        if not better:
            if after == before:  # the run kept its start: no evaluation beat it
                log.warning("recover: no state of the run was more faithful than the start on "
                            "the validation runs (held-out %s); writing the pruned model "
                            "unchanged",
                            fidelity.describe(before))
            else:
                log.warning("recover: held-out fidelity got worse (%s); writing the pruned "
                            "model unchanged", fidelity.change(before, after))
            _write_start(pruned, pruned_source, stage.model_path)
        else:
            write_proto(trained, stage.model_path)
        stage.commit()
    key = fidelity.headline(before)
    return RecoverReport(before, after, 0.0, {}, 0, 0.0,
                         KEPT_RECOVERED if better else KEPT_START, "", 1, str(output),
                         key[0] if key else "relative_error")


def _write_start(pruned: onnx.ModelProto, source: Model, path: Path) -> None:
    """The pruned model as given: its file's bytes when it is one file, else re-serialised."""
    if not isinstance(source, onnx.ModelProto):
        header = onnx.load(str(source), load_external_data=False)
        if not any(onnx.external_data_helper.uses_external_data(t)
                   for t in header.graph.initializer):
            shutil.copyfile(source, path)
            return
    write_proto(pruned, path)


def written_back(pruned: onnx.ModelProto, student: OnnxModule) -> onnx.ModelProto:
    """A copy of ``pruned`` with each trained initializer's values replaced (same name, dtype
    and shape), those of subgraphs (If, Loop, Scan bodies) too."""
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    tensors = student.onnx_tensors()
    slots = [(i.name, i) for i in model.graph.initializer]
    slots += control_flow.subgraph_initializers(model.graph, opset_of(model)).items()
    for name, init in slots:
        value = tensors.get(name)
        if isinstance(value, torch.nn.Parameter):
            array = value.detach().cpu().numpy()
            assert list(array.shape) == list(init.dims), init.name
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(numpy_helper.from_array(  # C order whatever the training layout
                np.ascontiguousarray(array, dtype=dtype), init.name))
    return model


def _check_runs(pruned: onnx.ModelProto, trained: onnx.ModelProto,
                held_out: dict[str, np.ndarray], take: int) -> None:
    """onnxruntime runs the trained model with the pruned model's output names and shapes, on
    ``take`` held-out samples (repeated if there are fewer: a model fixed at that batch)."""
    feeds = {k: v[np.arange(take) % len(v)] for k, v in held_out.items()}
    start = val.run(val.session(pruned, what="the pruned model"), feeds)
    val.check_signature(start, val.run(val.session(trained), feeds))
