"""Calibration data for a folder whose files pass caches to each other (``spa prune folder/
--calib C``): each file gets the samples it can be calibrated on, or none and follows.

* A file that passes nothing (an encoder, a decoder's ``model.onnx``) reads ``--calib`` as one
  file does.
* Of the plain files that write caches and read none back (a first-step decoder, the no-past
  branch of a merged one), the first by name is the **source** (a precision variant's
  decoders, family.variant, get no data: their quantised weights' refits would not be
  matched across files). When it reads an encoder's outputs (``encoder_hidden_states``),
  its samples are made from the encoder's, in the same order: the dense encoder's outputs on
  them, their attention mask, and the ``--decoder-tokens`` tokens the dense model decodes
  greedily from the config's ``decoder_start_token_id`` (pad tokens after EOS, as batched
  generation feeds them). Same order, same count, same seed: its held-out samples are the
  encoder's. A source that reads no encoder (a decoder-only model exported as two files)
  reads ``--calib``.
* Every other file (the decoders that read caches back, the other writers) gets no data: it is
  planned data-free, follows the source's plan through the weights they share (the family
  prefers a calibrated file's plan), and takes the source's refitted
  weights (:func:`take_refits`), so that the files stay one model.

The same sources (:func:`sources`, one per precision variant) give their compensated values
(OBSPA's update, with or without data) to the files of their variant that pass caches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from spa import calibration as calib_data
from spa import fidelity
from spa import validate as val
from spa.calibration.text import with_tokenizer
from spa.choices import AllocationMethod, HessianSource
from spa.errors import OptionError
from spa.ir.load import load_model
from spa.passes.importance import CRITERIA
from spa.passes.reconstruction import refitted_tensors

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis
    from spa.ir.load import LoadedModel
    from spa.pipeline import PruneOptions

log = logging.getLogger(__name__)
CHUNK = 16  # samples run at once through the dense encoder and decoder
HIDDEN = "encoder_hidden_states"
STAND_IN = "l2"  # the criterion of a file without data whose asked one needs data
CONFIG = "config.json"
#: A graph output's name prefix → the input prefixes another file reads it back under
#: (``present.0.decoder.key`` → ``past_key_values.0.decoder.key``).
PASSED = {"present": ("past_key_values", "past")}


def read_back(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``outputs`` that another file reads back (the caches), under the names it reads them."""
    return {f"{p}.{k.partition('.')[2]}": v for k, v in outputs.items()
            for p in PASSED.get(k.partition(".")[0], ())}


@dataclass(frozen=True)
class Feeds:
    """How the source decoder's inputs are made: from the ``encoder`` file's output
    ``hidden`` (to ``hidden_in``), its input ``mask`` (to ``mask_in``), and tokens (``ids``)
    decoded by the arg-max of its ``logits``."""

    encoder: str
    hidden: str
    hidden_in: str
    ids: str
    mask: str | None = None
    mask_in: str | None = None
    logits: str = "logits"  # the decoder's output whose last position names the next token


@dataclass(frozen=True)
class Calibrated:
    """Each file's options (with or without data), and the samples made for a decoder (file
    -> how)."""

    options: dict[str, PruneOptions]
    made: dict[str, dict]


def plan_options(path: Path, names: list[str], headers: Mapping[str, onnx.ModelProto],
                 free: Mapping[str, set[str]], options: PruneOptions, work: Path,
                 variant_of: Callable[[str], str], readers: Mapping[str, str]) -> Calibrated:
    """Per file of the folder at ``path``, the options it is planned with (see the module);
    made samples are saved as ``<work><decoder stem>.calib.npz``. ``readers``: per file that
    writes caches, the first file that reads them back (a with-past decoder: the made samples
    are decoded on the caches by it)."""
    # the plain files' first writer (a quantised variant's refits would not be matched)
    source = sources(names, headers, free, variant_of).get("")
    out: dict[str, PruneOptions] = {}
    made: dict[str, dict] = {}
    none = without_data(options)
    for n in names:
        if not free[n]:
            out[n] = options
        elif n != source:
            out[n] = none
        else:
            feeds = feeds_for(headers, n, [m for m in names if not free[m]
                                        and variant_of(m) == variant_of(n)])
            if feeds is None:
                out[n] = options
                continue
            out[n], made[n] = _made(path, n, feeds, options, work, readers.get(n))
    followers = [n for n in names if out[n] is none]
    if followers and none.criterion != options.criterion:
        log.warning("criterion %s scores from data, which %s do not get: they are planned by "
                    "%s, and their groups tied to the calibrated files follow those files' "
                    "choice", options.criterion, ", ".join(followers), none.criterion)
    return Calibrated(out, made)


def sources(names: list[str], headers: Mapping[str, onnx.ModelProto],
            free: Mapping[str, set[str]], variant_of: Callable[[str], str]) -> dict[str, str]:
    """Per precision variant (``""``: the plain files), the first of its files by name that
    writes caches and reads none back: the one whose refitted or compensated values the
    variant's other files that pass caches take (:func:`take_refits`)."""
    out: dict[str, str] = {}
    for n in names:
        if free[n] and not _reads_back(headers[n], free[n]):
            out.setdefault(variant_of(n), n)
    return out


def _reads_back(header: onnx.ModelProto, free: set[str]) -> bool:
    return any(i.name in free for i in header.graph.input)


def without_data(options: PruneOptions) -> PruneOptions:
    """``options`` for a file that follows: no data, and nothing that needs it (a criterion
    that scores from data only is stood in for by :data:`STAND_IN`: the groups the file
    shares with the calibrated one follow that file's choice)."""
    return dataclasses.replace(
        options, calib=None, held_out_data=None, tokenizer=None, reconstruct=None,
        criterion=STAND_IN if CRITERIA[options.criterion].needs_data else options.criterion,
        hessian=None if options.hessian is HessianSource.CALIBRATION else options.hessian,
        allocation=None if options.allocation is AllocationMethod.SENSITIVITY
        else options.allocation)


def _float_rank(v: onnx.ValueInfoProto, rank: int) -> bool:
    t = v.type.tensor_type
    return t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and \
        len(t.shape.dim) == rank


def feeds_for(headers: Mapping[str, onnx.ModelProto], decoder: str, encoders: list[str]
              ) -> Feeds | None:
    """How ``decoder``'s samples are made from one of ``encoders``; None when it reads no
    encoder output (it reads ``--calib`` itself)."""
    inputs = list(headers[decoder].graph.input)
    hidden_in = next((i.name for i in inputs if i.name == HIDDEN), None) or next(
        (i.name for i in inputs if _float_rank(i, 3)), None)
    if hidden_in is None:
        return None
    found = [e for e in sorted(encoders, key=lambda e: ("encoder" not in e, e))
             if sum(_float_rank(o, 3) for o in headers[e].graph.output) == 1]
    if not found:
        raise OptionError(f"{decoder}: reads '{hidden_in}' from an encoder, and no other file "
                          "of the folder has one such output to make its calibration samples")
    enc = found[0]
    hidden = next(o.name for o in headers[enc].graph.output if _float_rank(o, 3))
    enc_inputs = {i.name for i in headers[enc].graph.input}
    ids = mask = mask_in = None
    for i in inputs:
        if i.name == hidden_in:
            continue
        if "encoder" in i.name and "mask" in i.name and "attention_mask" in enc_inputs:
            mask, mask_in = "attention_mask", i.name
        elif i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) \
                and ids is None:
            ids = i.name
        else:
            raise OptionError(f"{decoder}: cannot make calibration samples for its input "
                              f"'{i.name}' (it takes {hidden_in} from {enc}, token ids and an "
                              "encoder attention mask)")
    if ids is None:
        raise OptionError(f"{decoder}: has no token id input to decode calibration samples")
    outputs = list(headers[decoder].graph.output)
    logits = next((o.name for o in outputs if o.name == "logits"), None) or next(
        (o.name for o in outputs if _float_rank(o, 3)), None)
    if logits is None:
        raise OptionError(f"{decoder}: has no output of next-token scores [batch, tokens, "
                          "vocabulary] to decode calibration samples with")
    return Feeds(enc, hidden, hidden_in, ids, mask, mask_in, logits)


def _made(path: Path, decoder: str, feeds: Feeds, options: PruneOptions, work: Path,
          step: str | None = None) -> tuple[PruneOptions, dict]:
    """The decoder's options reading samples made from the encoder's (saved at ``work`` +
    name), decoded on the caches by ``step`` when given."""
    config = read_token_config(path)
    start = config.get("decoder_start_token_id")
    if not isinstance(start, int):
        raise OptionError(f"{decoder}: {path / CONFIG} states no decoder_start_token_id: "
                          "cannot decode calibration samples for it")
    eos, pad = config.get("eos_token_id"), config.get("pad_token_id")
    enc_model = load_model(str(path / feeds.encoder))
    opts = with_tokenizer(options, options.calib, path / feeds.encoder)
    assert opts.calib is not None, "only options with calibration data come here"
    tokens = (start, eos, pad, options.decoder_tokens)
    calib = _made_file(path, decoder, feeds, opts, opts.calib, enc_model, tokens,
                       Path(f"{work}{Path(decoder).stem}.calib.npz"), step)
    held = None
    if options.held_out_data:
        held = _made_file(path, decoder, feeds, opts, options.held_out_data, enc_model, tokens,
                          Path(f"{work}{Path(decoder).stem}.held_out.npz"), step)
    how = {"from": feeds.encoder, "encoder_output": feeds.hidden,
           "tokens": options.decoder_tokens,
           "decoder_start_token_id": start}
    # the made samples are read whole, as they are (no tokenizer, no --calib-samples again)
    return dataclasses.replace(options, calib=str(calib), held_out_data=held, tokenizer=None,
                               calib_samples=None, pack=False), how


def decoded_mask(ids: np.ndarray, eos: Collection[int]) -> np.ndarray:
    """1 at the positions of greedily decoded ``ids`` (``[samples, tokens]``, the start token
    first) whose logits chose a token, up to and including the one that chose the first EOS;
    0 after it, where the logits predict what follows an EOS (padding)."""
    ends = np.isin(ids[:, 1:], list(eos))
    last = np.where(ends.any(1), ends.argmax(1), ids.shape[1] - 1)  # the logit that chose EOS
    return (np.arange(ids.shape[1])[None, :] <= last[:, None]).astype(np.int64)


def eos_ids(path: Path) -> set[int]:
    """The EOS token ids of the folder at ``path`` (config.json, generation_config.json)."""
    return _ids(read_token_config(path).get("eos_token_id"))


def _ids(value: object) -> set[int]:
    """A config's token id entry (an id, a list of them, or none) as a set."""
    return set(value if isinstance(value, list) else [value]) - {None}


def read_token_config(path: Path) -> dict:
    """The folder's config.json with its generation_config.json's token ids over it."""
    out: dict = {}
    for name in (CONFIG, "generation_config.json"):
        f = path / name
        if f.is_file():
            try:
                out |= {k: v for k, v in json.loads(f.read_text(encoding="utf-8")).items()
                        if v is not None}
            except (OSError, ValueError) as exc:
                raise OptionError(f"{f}: not readable JSON ({exc})") from None
    return out


def _made_file(path: Path, decoder: str, feeds: Feeds, opts: PruneOptions, source: str,
               enc_model: LoadedModel, tokens: tuple[int, object, object, int], out: Path,
               step: str | None = None) -> str:
    """Read ``source`` as the encoder's samples, make the decoder's, save them at ``out``."""
    inputs = enc_model.graph.inputs
    try:
        _, arrays = calib_data.read(source, inputs, opts.calibration, graph=enc_model.graph,
                                    seed=opts.seed)
        arrays = calib_data.fitted(arrays, inputs)
    except OptionError as exc:
        raise OptionError(f"{feeds.encoder}: {exc}") from None
    made = decoder_samples(path / feeds.encoder, path / decoder, feeds, arrays, *tokens,
                           step=None if step is None else path / step)
    np.savez(out, **made)  # type: ignore[arg-type]  # (numpy's stub: a key could be allow_pickle)
    log.info("%s: %d calibration samples decoded by the dense model from %s's", decoder,
             calib_data.sample_count(made), feeds.encoder)
    return str(out)


def decoder_samples(encoder: Path, decoder: Path, feeds: Feeds,
                    arrays: Mapping[str, np.ndarray], start: int, eos: object, pad: object,
                    tokens: int, step: Path | None = None) -> dict[str, np.ndarray]:
    """The dense decoder's inputs on the encoder's samples ``arrays``: the encoder's outputs,
    the attention mask, and ``tokens`` ids decoded greedily from ``start`` (``pad`` after an
    ``eos``), in the samples' order. With ``step`` (a decoder that reads ``decoder``'s caches
    back), each token after the first is decoded on the caches, one token a run, instead of
    running ``decoder`` over the whole prefix again (the same tokens but where two scores tie
    to float rounding)."""
    enc = val.session(str(encoder), what=encoder.name)
    dec = val.session(str(decoder), what=decoder.name)
    later = None if step is None else val.session(str(step), what=step.name)
    wanted = set() if later is None else {i.name for i in later.get_inputs()}
    enc_in = [i.name for i in enc.get_inputs()]
    id_type = next(np.int32 if "int32" in i.type else np.int64 for i in dec.get_inputs()
                   if i.name == feeds.ids)
    ends = _ids(eos)
    fill = pad if isinstance(pad, int) else start
    parts: dict[str, list[np.ndarray]] = {}
    n = calib_data.sample_count(arrays)
    for lo in range(0, n, CHUNK):
        chunk = {k: np.asarray(arrays[k][lo:lo + CHUNK]) for k in enc_in}
        hidden = val.run(enc, chunk)[feeds.hidden]
        fed = {feeds.hidden_in: hidden}
        if feeds.mask is not None and feeds.mask_in is not None:
            fed[feeds.mask_in] = chunk[feeds.mask]
        ids = np.full((len(hidden), 1), start, id_type)
        done = np.zeros(len(hidden), bool)
        out = val.run(dec, fed | {feeds.ids: ids})
        past = read_back(out)
        while ids.shape[1] < tokens:
            if later is None:  # the whole prefix again
                out = val.run(dec, fed | {feeds.ids: ids}) if ids.shape[1] > 1 else out
            nxt = np.where(done, fill, out[feeds.logits][:, -1].argmax(-1)).astype(id_type)
            done |= np.isin(nxt, list(ends))
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            if later is not None and ids.shape[1] < tokens:
                out = val.run(later, {k: v for k, v in (fed | past).items() if k in wanted}
                              | {feeds.ids: nxt[:, None]})
                past.update(read_back(out))
        for k, v in (fed | {feeds.ids: ids}).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def take_refits(folder: Path, source: str, originals: Mapping[str, Mapping[str, str]]
                ) -> dict[str, int]:
    """Write into each other pruned file of ``folder`` the values the ``source`` file was
    written with, for every tensor of the same role (:func:`roles`) in the two: what
    reconstruction refitted, or OBSPA's compensation updated, in the source. A precision
    variant's weights are other bytes (int8, float16) and take nothing; a copy of the same
    bytes takes them. ``originals``: the digests of the weights before pruning
    (:func:`weight_digests`) of the source and of the files that may take its values (those
    that pass tensors: an encoder refits its own). Returns the values taken per file (files
    whose values were already equal are not rewritten)."""
    taken: dict[str, int] = {}
    model = onnx.load(str(folder / source))
    written = {i.name: i for i in model.graph.initializer}
    source_roles = roles(originals[source], model)
    for n in originals:
        if n == source or not (folder / n).is_file():
            continue
        model = onnx.load(str(folder / n))
        pairs = _same(source_roles, roles(originals[n], model))
        count = replace_values(model, {k: written[s] for k, s in pairs.items() if s in written})
        if count:
            onnx.save(model, str(folder / n))
            taken[n] = count
    return taken


def replace_values(model: onnx.ModelProto, values: Mapping[str, onnx.TensorProto], *,
                   strict: bool = False) -> int:
    """Write ``values`` (by ``model``'s initializer names) into ``model`` where they differ
    from its own; how many were written. A value of another shape or type is skipped, or with
    ``strict`` an error."""
    count = 0
    for init in model.graph.initializer:
        value = values.get(init.name)
        if value is None:
            continue
        new, old = numpy_helper.to_array(value), numpy_helper.to_array(init)
        if new.shape != old.shape or new.dtype != old.dtype:
            if strict:
                raise OptionError(f"'{init.name}' is {old.dtype}{old.shape}, the value to "
                                  f"write {new.dtype}{new.shape}")
            continue
        if not np.array_equal(new, old):
            init.CopyFrom(numpy_helper.from_array(new, init.name))
            count += 1
    return count


def together(original: Path, written: Path, feeds: Feeds, decoder: str,
             encoder_held: Mapping[str, np.ndarray], decoder_held: Mapping[str, np.ndarray],
             eos: set[int] | None = None) -> dict[str, float]:
    """Held-out fidelity of the pruned encoder and decoder in ``written`` run together: the
    pruned encoder's outputs on its held-out samples fed to the pruned decoder with the dense
    model's decoded tokens, against the dense decoder (in ``original``) on the dense encoder's
    outputs (the decoder's held-out samples, made from the same samples in the same order).
    With ``eos``, at the positions up to the one that chose the first EOS
    (:func:`decoded_mask`; after it the logits predict padding)."""
    enc = val.session(str(written / feeds.encoder), what=feeds.encoder)
    hidden = val.run_chunked(enc, {i.name: np.asarray(encoder_held[i.name])
                                   for i in enc.get_inputs()})[feeds.hidden]
    dense = val.session(str(original / decoder), what=decoder)
    pruned = val.session(str(written / decoder), what=decoder)
    fed = {i.name: np.asarray(decoder_held[i.name]) for i in dense.get_inputs()}
    ref = val.run_chunked(dense, fed)[feeds.logits]
    out = val.run_chunked(pruned, fed | {feeds.hidden_in: hidden})[feeds.logits]
    real = decoded_mask(np.asarray(fed[feeds.ids]), eos).astype(bool) if eos else None
    return fidelity.compare([ref], [out], real)


def digest(values: np.ndarray) -> str:
    """A digest of an array's type, shape and bytes (a weight two files hold alike)."""
    v = np.ascontiguousarray(values)
    h = hashlib.sha256(f"{v.dtype}{v.shape}".encode())
    h.update(v.tobytes())
    return h.hexdigest()


def weight_digests(analysis: Analysis) -> dict[str, str]:
    """The digest of each weight (a constant of two or more dims) of ``analysis``' graph, taken
    before the file is written: writing updates the graph's weights in place (OBSPA's
    compensation, each file from its own statistics)."""
    return {name: digest(t.values) for name, t in analysis.model.graph.tensors().items()
            if isinstance(t, gs.Constant) and len(t.shape) >= 2}


def roles(digests: Mapping[str, str], written: onnx.ModelProto) -> dict[str, str]:
    """What each tensor reconstruction may refit in the pruned file ``written``
    (:func:`spa.passes.reconstruction.refitted_tensors`) is: a layer's weight by the digest of
    its original bytes (``digests``, :func:`weight_digests`; unique among the layers'
    weights), its bias as that weight's bias. Biases are often equal (zeros) and copied apart
    per reader under numbered names, so their bytes and names say nothing about which layer
    they belong to."""
    layers = [(w, b) for w, b in refitted_tensors(written) if w in digests]
    once = {d for d, k in Counter(digests[w] for w, _ in layers).items() if k == 1}
    out: dict[str, str] = {}
    for w, b in layers:
        d = digests[w]
        if d in once:
            out[w] = d
            if b is not None:
                out[b] = f"bias of {d}"
    return out


def _same(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, str]:
    """Names in ``b`` -> the names in ``a`` of the same role (each role once in a file)."""
    by_role = {r: n for n, r in a.items()}
    return {n: by_role[r] for n, r in b.items() if r in by_role}
