"""An encoder and its first-step decoder as one graph, trained together (``spa prune folder/
--calib C --recover N``, spa/pipeline/family.py).

A seq2seq folder's files are one model: distilling the encoder and the decoder apart would
train each against the dense model's tensors between them, and every file that reads back the
decoder's caches must keep the values the decoder has. So the pruned encoder and first-step
decoder are joined into one graph (:func:`joined`): the encoder's inputs, the tokens the
dense model decoded and a mask of those whose logits count (:func:`encdec.decoded_mask`)
in, the decoder's logits out, the encoder's output and attention mask wired into the decoder. The
dense pair is joined the same way and is the teacher (spa/torch/recover.py distils and judges
it like any one-file model).

Which values train (:func:`trainable`):

* the encoder's, except a weight another file holds byte for byte (a shared embedding): those
  must stay the same in every file;
* the decoder's layers' weights and biases that have a role in it (:func:`encdec.roles`): the
  files that read its caches back (the with-past decoder, a merged decoder's branches) take
  them by role afterwards (:func:`encdec.take_refits`), as they take reconstruction's refits;
* nothing else of the decoder (its embeddings and normalisations): the other decoders hold
  them too, and nothing says which of theirs is which.

What does not train is a ``Constant`` node of the joined graph, so it is not a parameter.
:func:`written_apart` writes the trained values back into the two files.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa.calibration import Calibration, attended_lengths, sample_count
from spa.errors import OptionError
from spa.ir.dtypes import is_trainable
from spa.pipeline import encdec

ENCODER = "encoder/"  # the prefix of the encoder's names in the joined graph
DECODER = "decoder/"
DECODER_IDS = "decoder_input_ids"  # the joined graph's input of the decoder's tokens
#: The encoder's attention mask, renamed: the joined graph's logits have a value per decoder
#: token, and a mask over the encoder's tokens must not be read as theirs (spa.fidelity).
MASK = "encoder_attention"
#: An input no node reads, of the decoder's tokens whose logits count: up to its first EOS
#: (the logits after it predict padding). Distillation and fidelity read the first input named
#: like a mask as the one over the logits' tokens (spa.fidelity ``per_token``); its length is
#: static, so that no token input is cut to its last attended column (spa/torch/augment.py).
DECODER_MASK = "decoder_attention_mask"
class Distil(Protocol):
    """``distil(dense, pruned, calibration, work)``: the pruned graph distilled from the dense
    one on ``calibration`` (scratch files in the folder ``work``), or None when the start was
    more faithful on the held-out samples; and the run's report
    (:func:`~spa.torch.recover.joint_distiller`). ``joined``: the graphs are an encoder and
    decoder joined (:func:`joined`), whose token mask no node reads."""

    def __call__(self, dense: onnx.ModelProto, pruned: onnx.ModelProto,
                 calibration: Calibration, work: Path, *, joined: bool = True
                 ) -> tuple[onnx.ModelProto | None, dict]: ...


def recovered(src: Path, written: Path, encoder: str, decoder: str, feeds: encdec.Feeds,
              calibrations: tuple[Calibration, Calibration],
              digests: Mapping[str, Mapping[str, str]], distil: Distil) -> dict:
    """Distil the pruned ``encoder`` and ``decoder`` in ``written`` from the dense ones in
    ``src`` together, write the trained values back, and have the files that pass caches take
    the decoder's (``digests``: their weights before pruning, :func:`encdec.weight_digests`).
    The report: the distillation's, the values each file was written with (``trained``) and
    took (``taken``)."""
    enc, dec = (onnx.load(str(written / n)) for n in (encoder, decoder))
    others = [onnx.load(str(f)) for f in sorted(written.glob("*.onnx"))
              if f.name not in (encoder, decoder)]
    train = trainable(enc, dec, digests[decoder], others)
    tokens = np.shape(calibrations[1].train[feeds.ids])[1]
    dense = joined(onnx.load(str(src / encoder)), onnx.load(str(src / decoder)), feeds, tokens)
    samples = calibration(*calibrations, feeds, encdec.eos_ids(src), _symbolic_tokens(enc))
    trained, report = distil(dense, joined(enc, dec, feeds, tokens, train), samples, written)
    done = {"encoder": encoder, "decoder": decoder, "values": len(train), "trained": {},
            "taken": {}}
    if trained is not None:
        done["trained"] = written_apart(trained, written, (encoder, enc), (decoder, dec))
        done["taken"] = encdec.take_refits(written, decoder, digests)
    return report | done


def recovered_alone(src: Path, written: Path, name: str, calibration: Calibration,
                    digests: Mapping[str, Mapping[str, str]], distil: Distil) -> dict:
    """Distil the pruned file ``name`` in ``written`` from the dense one in ``src`` on its
    own calibration (a folder with no encoder: a decoder beside its with-past twin, a file
    beside its float16 or int8 copies), write the trained values back, and have the files
    that pass caches with it take them by role (``digests``: their weights before pruning).
    Only the values that have a role train when such files take them (:func:`trainable`'s
    rule for a decoder); else every trainable value."""
    model = onnx.load(str(written / name))
    train = set(encdec.roles(digests[name], model)) if name in digests else None
    values = [i for i in model.graph.initializer if i.name in train] if train is not None \
        else [i for i in model.graph.initializer if is_trainable(numpy_helper.to_array(i))]
    student = _frozen(model, train)
    trained, report = distil(onnx.load(str(src / name)), student, calibration, written,
                             joined=False)
    done = {"file": name, "values": len(values), "trained": {}, "taken": {}}
    if trained is not None:
        done["trained"] = {name: _written_back(trained, written, name, model, "")}
        if name in digests:  # files pass caches with it: they take its trained values
            done["taken"] = encdec.take_refits(written, name, digests)
    return report | done


def _frozen(model: onnx.ModelProto, train: Collection[str] | None) -> onnx.ModelProto:
    """``model`` with the initializers not in ``train`` (None: none) as ``Constant`` nodes,
    which do not train."""
    if train is None:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts, kept = _split(list(model.graph.initializer), train)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    nodes = [*consts, *model.graph.node]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _split(inits: list[onnx.TensorProto], train: Collection[str] | None
           ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``inits`` parted into ``Constant`` nodes (those not in ``train``) and the rest."""
    consts, kept = [], []
    for init in inits:
        if train is None or init.name in train:
            kept.append(init)
        else:
            consts.append(helper.make_node("Constant", [], [init.name], value=init,
                                           name=f"frozen:{init.name}"))
    return consts, kept


def joined(encoder: onnx.ModelProto, decoder: onnx.ModelProto, feeds: encdec.Feeds,
           tokens: int, train: Collection[str] | None = None) -> onnx.ModelProto:
    """The encoder and the decoder as one graph (see the module), fed ``tokens`` decoder
    tokens; ``train``: the joined names of the initializers that stay initializers (None:
    all), the others become ``Constant`` nodes."""
    inits = {i.name for i in encoder.graph.initializer}
    enc_inputs = [i for i in encoder.graph.input if i.name not in inits]
    outside = {i.name: (MASK if i.name == feeds.mask else i.name) for i in enc_inputs}
    enc = _renamed(encoder.graph, ENCODER, outside)
    hidden = ENCODER + feeds.hidden
    dec_inits = {i.name for i in decoder.graph.initializer}
    wired = {feeds.hidden_in: hidden, feeds.ids: DECODER_IDS}
    if feeds.mask_in is not None:
        wired[feeds.mask_in] = MASK
    extra = [i.name for i in decoder.graph.input if i.name not in dec_inits and i.name not in wired]
    if extra:
        raise OptionError(f"cannot train the encoder and decoder together: the decoder reads "
                          f"{extra} besides the encoder's outputs and its tokens")
    dec = _renamed(decoder.graph, DECODER, wired)
    logits = DECODER + feeds.logits
    ids = next(i for i in decoder.graph.input if i.name == feeds.ids)
    batch = ids.type.tensor_type.shape.dim[0]
    mask = helper.make_tensor_value_info(DECODER_MASK, onnx.TensorProto.INT64, [
        batch.dim_param or batch.dim_value or None, tokens])
    inputs = [mask, *(_value(i, outside[i.name]) for i in enc_inputs), _value(ids, DECODER_IDS)]
    out = next(o for o in decoder.graph.output if o.name == feeds.logits)
    nodes = _needed([*enc.node, *dec.node], {logits})
    read = {i for n in nodes for i in n.input}
    consts, kept = _split([i for i in [*enc.initializer, *dec.initializer] if i.name in read],
                          train)
    graph = helper.make_graph([*consts, *nodes], "encoder_decoder", inputs,
                              [_value(out, logits)], kept)
    opsets: dict[str, int] = {}
    for o in [*encoder.opset_import, *decoder.opset_import]:
        opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in sorted(opsets.items())])
    model.ir_version = max(encoder.ir_version, decoder.ir_version)
    return model


def trainable(encoder: onnx.ModelProto, decoder: onnx.ModelProto,
              decoder_digests: Mapping[str, str], others: Collection[onnx.ModelProto]
              ) -> set[str]:
    """The joined names of the values that train (see the module). ``decoder_digests``: the
    decoder's weights before pruning (:func:`encdec.weight_digests`); ``others``: the folder's
    other written files."""
    held = {encdec.digest(numpy_helper.to_array(i)) for m in (decoder, *others)
            for i in m.graph.initializer if len(i.dims) >= 2}
    values = {i.name: numpy_helper.to_array(i) for i in encoder.graph.initializer}
    out = {ENCODER + n for n, v in values.items() if is_trainable(v)
           and (v.ndim < 2 or encdec.digest(v) not in held)}
    return out | {DECODER + n for n in encdec.roles(decoder_digests, decoder)}


def calibration(encoder: Calibration, decoder: Calibration, feeds: encdec.Feeds,
                eos: Collection[int], cut: bool = True) -> Calibration:
    """The joined graph's samples: the encoder's, with the tokens of the decoder's samples
    (made from the encoder's in the same order, spa/pipeline/encdec.py) and the mask of those
    whose logits count (up to the first of the ``eos`` ids). With ``cut`` (the encoder's
    token axis is symbolic), its token inputs are cut after the last column any sample
    attends to (text padded to ``--max-length``): distillation cuts no padding of the joined
    graph batch by batch (:data:`MASK`)."""
    width = _attended_width(feeds.mask, encoder.train, encoder.held_out) if cut else None

    def arrays(enc: Mapping[str, np.ndarray], dec: Mapping[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
        if sample_count(enc) != sample_count(dec):
            raise OptionError(f"the encoder has {sample_count(enc)} samples and the decoder "
                              f"{sample_count(dec)}: they are not one set")
        ids = np.asarray(dec[feeds.ids])
        cut = {k: (v[:, :width] if width is not None and np.ndim(v) == 2 else v)
               for k, v in enc.items()}
        return {DECODER_MASK: encdec.decoded_mask(ids, eos)} | {
            (MASK if k == feeds.mask else k): v for k, v in cut.items()} | {DECODER_IDS: ids}

    return Calibration(arrays(encoder.train, decoder.train),
                       arrays(encoder.held_out, decoder.held_out), encoder.kind,
                       encoder.path, encoder.held_out_path, encoder.tokenizer)


def _symbolic_tokens(model: onnx.ModelProto) -> bool:
    """Whether every 2-D graph input of ``model`` has a token axis of no fixed length."""
    inits = {i.name for i in model.graph.initializer}
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input if i.name not in inits]
    return all(d[1].dim_value <= 0 for d in dims if len(d) == 2)


def _attended_width(mask: str | None, *splits: Mapping[str, np.ndarray]) -> int | None:
    """One past the last column of ``mask`` any sample of ``splits`` attends to, when every
    2-D input of the splits is that wide (token inputs); None otherwise."""
    if mask is None or any(mask not in s for s in splits):
        return None
    full = np.shape(splits[0][mask])[1]
    if any(np.ndim(v) == 2 and np.shape(v)[1] != full for s in splits for v in s.values()):
        return None
    return max(1, *(int(attended_lengths(np.asarray(s[mask])).max(initial=0)) for s in splits))


def written_apart(trained: onnx.ModelProto, folder: Path,
                  encoder: tuple[str, onnx.ModelProto], decoder: tuple[str, onnx.ModelProto]
                  ) -> dict[str, int]:
    """Write the trained initializers of the joined graph back into ``folder``'s ``encoder``
    and ``decoder`` files (each its name and its model as read from there; same names, shapes
    and types); the values changed per file."""
    return {name: _written_back(trained, folder, name, model, prefix)
            for (name, model), prefix in ((encoder, ENCODER), (decoder, DECODER))}


def _written_back(trained: onnx.ModelProto, folder: Path, name: str, model: onnx.ModelProto,
                  prefix: str) -> int:
    """Write the initializers of ``trained`` named ``prefix`` + a name of ``model``'s into
    ``model`` and save it as ``folder / name`` when any changed; how many did."""
    values = {i.name.removeprefix(prefix): i for i in trained.graph.initializer
              if i.name.startswith(prefix)}
    try:
        count = encdec.replace_values(model, values, strict=True)
    except OptionError as exc:
        raise OptionError(f"{name}: trained {exc}") from None
    if count:
        onnx.save(model, str(folder / name))
    return count


def _renamed(graph: onnx.GraphProto, prefix: str, outside: Mapping[str, str]
             ) -> onnx.GraphProto:
    """A copy of ``graph`` with every name prefixed, except the inputs in ``outside``
    (renamed to their value there)."""
    def name(n: str) -> str:
        return n if not n else outside.get(n, prefix + n)

    out = onnx.GraphProto()
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            raise OptionError(f"cannot train the encoder and decoder together: node "
                              f"'{node.name}' ({node.op_type}) holds a subgraph")
        copy = out.node.add()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        copy.input[:] = [name(i) for i in node.input]
        copy.output[:] = [name(o) for o in node.output]
    for init in graph.initializer:
        copy = out.initializer.add()
        copy.CopyFrom(init)
        copy.name = name(init.name)
    return out


def _needed(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The ``nodes`` the ``outputs`` are computed from, in their order."""
    wanted, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in wanted for o in node.output):
            keep.append(node)
            wanted.update(i for i in node.input if i)
    return keep[::-1]


def _value(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = name
    return out

