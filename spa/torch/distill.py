"""The training side of ``spa recover`` (:mod:`spa.torch.recover`): distil the dense model into
the pruned one in PyTorch.

Both models are ONNX files; :func:`spa.torch.from_onnx` makes them torch modules. The pruned
one (the student) trains its float initializers; the dense one (the teacher) answers the same
augmented batch (on CPU in onnxruntime, :class:`_OrtTeacher`), or, when batches are not
augmented, every training sample once before training (:meth:`Distiller._answers`;
all-MiniLM-L6-v2 with ``--token-dropout 0``: a quarter less time a step).
The loss, per float output ``s`` of the student and ``t`` of the teacher:

* class scores (``[N, C]``, ``C ≥ 2``, rows not unit vectors):
  ``T² · KL(softmax(t/T) ‖ softmax(s/T))``;
* anything else (embeddings…): ``1 − cos(s, t) + ‖s − t‖² / ‖t‖²`` (per sample, averaged);

plus a weight (``--matched-weight``; 0.1, or 10 when a check on the validation runs favours
it) × the mean normalised squared error ``‖s − t‖² / ‖t‖²`` over up to 16 intermediate
values both graphs still share (same name, same shape: residual streams when only inner widths
were pruned) and pruning moved, evenly spread through the graph, the last one always among them
(when the teacher answers once: as many as fit in memory, none with cut token batches).

Augmentation, on the training split only: images (4-D float inputs) get random resized crops
(area 0.6–1), horizontal flips and mixup (``λ ~ Beta(0.4, 0.4)``); token inputs with an
attention mask get token dropout (``--token-dropout``, default 0.3: that share of the
attended tokens other than the first and the last is masked out; all-MiniLM-L6-v2, 1500 steps:
held-out-text cosine 0.9640 without, 0.9661 at 0.1, 0.9673 at 0.3), and training batches of
tokens are cut after their last attended column, each made of samples of similar length
(:class:`spa.torch.augment.Batches`). Every run (each
learning-rate trial, the full run) draws the same batches and augmentation.
AdamW (fused), cosine decay to 0 over the budget (steps or seconds).

The learning rate is chosen on validation runs of the training samples (:func:`judged`), which
never train: unless given, each of :data:`LR_TRIALS` trains a short trial from the same start and
the most faithful one (spa/fidelity.py), or a larger one that gained at least half as much over
the start (:func:`pick_lr`), is the pick. A budget long enough for it then checks the pick
against the next larger rate over a longer horizon (:data:`CHECK_SHARE` of the budget each, when
that is at least :data:`CHECK_MIN_STEPS` steps; :meth:`Distiller.choose_lr`): short trials favour
small rates, which lose over a long run. When they ran, a third check at the chosen rate tries
the matched-value weight :data:`MATCHED_HEAVY`, kept when it ends more faithful. The winner
trains the full budget; fidelity on the validation runs is measured every tenth of it and the
best state is kept (early stopping after 3 evaluations without improvement). The held-out
split only measures the result (:mod:`spa.torch.recover` keeps the start when it is not more
faithful there).

Under ``torchrun`` (``WORLD_SIZE > 1``) the student is wrapped in DistributedDataParallel, each
process takes its share of every batch and process 0 makes every decision. Reading and writing
the ONNX files is left to :mod:`spa.torch.recover`, the only module in ``spa`` that imports this
one.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from spa import fidelity
from spa.calibration import Arrays, Calibration, sample_count, tokenless_outputs, validation_runs
from spa.errors import OptionError, ValidationError
from spa.progress import progress
from spa.recovery import RecoverOptions
from spa.torch.augment import (
    Batches,
    attended_lengths,
    augment,
    augmented,
    input_kinds,
    trim_padding,
)
from spa.torch.interpreter import Answer, OnnxModule, from_onnx, in_chunks, with_outputs

if TYPE_CHECKING:
    from spa.torch.recover import GraphInput

LR_TRIALS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
TRIAL_STEPS = 30  # at most; a fifth of the step budget when that is smaller
TRIAL_GAIN_SHARE = 0.5  # a larger learning rate wins with this share of the best trial's gain
CHECK_SHARE = 0.05  # of the budget, each longer trial checking the rate's pick or the weight
CHECK_MIN_STEPS = 4 * TRIAL_STEPS  # shorter checks say no more than the trials: not run
MATCHED_MAX = 16  # intermediate values matched
MATCHED_WEIGHT = 0.1
MATCHED_HEAVY = 10.0  # the weight checked against MATCHED_WEIGHT (Distiller._choose_weight)
EVALUATIONS = 10  # held-out evaluations over a run
PATIENCE = 3
FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW (torch ≥ 2.4)
ANSWERS_BYTES = 1 << 30  # at most, the teacher's answers on the training samples held

Batch = list[torch.Tensor]
Runs = dict[float, dict[str, float]]  # a learning rate or weight → validation-run fidelity
log = logging.getLogger(__name__)


def headline(metrics: dict[str, float]) -> str:
    """The headline measure, for logs and the progress bar: ``agreement 0.9812``."""
    key = fidelity.headline(metrics)
    return f"{key[0]} {key[1]:.4f}" if key else f"relative error {metrics['relative_error']:.4f}"


@dataclass
class World:
    """This process's place among the ``torchrun`` processes (one process: rank 0 of 1)."""

    rank: int
    size: int
    device: torch.device
    owns_group: bool = False

    @staticmethod
    def start(device: str) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise OptionError("--device cuda: PyTorch sees no CUDA device")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        where = torch.device("cuda", local) if cuda else torch.device("cpu")
        if size == 1:
            return World(0, 1, where)
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if cuda else "gloo")
        return World(dist.get_rank(), dist.get_world_size(), where, owns)

    def decide(self, value: Any) -> Any:
        """Process 0's ``value``, in every process."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            # DistributedDataParallel sits in reference cycles: collected at exit, after the
            # group is gone, its reducer's thread aborted the process (std::terminate) in about
            # 1 run in 2 on a loaded machine. Collect it while the group lives, and let no
            # process tear the group down while another still talks.
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


class Distiller:
    """The student, the teacher, the data and one training run at a time. ``inputs`` are the
    pruned model's graph inputs (:func:`spa.torch.recover.graph_inputs`)."""

    def __init__(self, dense: onnx.ModelProto, pruned: onnx.ModelProto,
                 inputs: Sequence[GraphInput], calibration: Calibration,
                 options: RecoverOptions, world: World):
        self.options, self.world = options, world
        train, judge = judged(calibration)
        self.train_data = _tensors(train, inputs, "training", world.device)
        self.judge_data = _tensors(judge, inputs, "validation", world.device)
        self.held_data = _tensors(calibration.held_out, inputs, "held-out", world.device)
        self.kinds = input_kinds(inputs)
        self.cut_outputs = bool(self.kinds.trimmed) and tokenless_outputs(pruned)
        self.student = _channels_last(from_onnx(pruned).to(world.device))
        self.fixed = fixed_batch(self.student)
        teacher = _teacher(dense, world.device)
        self.start_state = _state(self.student)
        n = len(self.train_data[0])
        if n < world.size:
            raise OptionError(f"{n} training sample(s) cannot be shared by {world.size} "
                              "processes")
        self.batch = min(max(options.batch_size, world.size), n)
        self.matched = self._matched(teacher)
        self.matched_weight = MATCHED_WEIGHT if options.matched_weight is None \
            else options.matched_weight
        self.batches, self.rng = self._draws()
        with torch.no_grad():
            self.judge_teacher = self._outputs(teacher, self.judge_data)
            self.held_teacher = self._outputs(teacher, self.held_data)
            self.answers = self._answers(teacher)
        # The torch module answers each batch unless the samples are answered once; on CPU
        # onnxruntime takes over (training holds one runnable copy of the teacher).
        self.teacher: OnnxModule | None = teacher if self.answers is None else None
        del teacher
        self.ort_teacher = self._onnxruntime_teacher(dense, inputs)
        self.scores = [fidelity.class_scores(o) for o in self.held_teacher]
        self.start_fidelity = self.evaluate()
        self.model: torch.nn.Module = self.student
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [world.device.index] if world.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.student, device_ids=ids)

    def _matched(self, teacher: OnnxModule) -> list[str]:
        """Up to :data:`MATCHED_MAX` intermediate values, evenly spread (first and last
        included), that both graphs compute under the same name and with the same shape, and
        that pruning changed."""
        taught = set(teacher.value_names()) - set(self.student.output_names)
        shared = [n for n in self.student.value_names() if n in taught]
        if not shared:
            return []
        probe = [t[:self.fixed or 2] for t in self.train_data]
        with torch.no_grad():
            _, s = _forward(self.student, probe, shared, self.fixed)
            _, t = _forward(teacher, probe, shared, self.fixed)
        # Values pruning left exactly as they were (embeddings, masks) teach nothing.
        moved = [n for n in shared if s[n].is_floating_point() and s[n].shape == t[n].shape
                 and s[n].dim() > 0 and s[n].shape[0] == len(probe[0])
                 and not torch.equal(s[n], t[n])]
        return _spread(moved, MATCHED_MAX)

    def _answers(self, teacher: OnnxModule
                 ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]] | None:
        """The teacher's outputs and matched values on every training sample, in order,
        computed once before training; None when the teacher answers each batch instead: the
        batches are augmented (:func:`spa.torch.augment.augmented`), or its outputs on all
        the samples would take more than :data:`ANSWERS_BYTES`.

        Matched values are kept as far as they fit, evenly spread; none when token batches are
        cut after their last attended column (they have a token axis). Measured on
        all-MiniLM-L6-v2 (heads+MLP 0.3, 4096 training lines, 300 steps at 1e-4): without
        token dropout and matched values, the held-out-text cosine is 0.9611 (with both:
        0.9615) and answered once it is the same to 16 digits, in 121 s of training instead
        of 160 s, after 13 s answering the samples."""
        if augmented(self.kinds, self.options.token_dropout) or (
                self.kinds.trimmed and not self.cut_outputs):
            return None
        n = len(self.train_data[0])
        outputs, values = _forward(teacher, [t[:self.fixed or 1] for t in self.train_data],
                                   self.matched, self.fixed)
        outputs = tuple(o[:1] for o in outputs)  # one sample's
        values = {n: v[:1] for n, v in values.items()}
        held = n * sum(o.element_size() * o.numel() for o in outputs)
        if held > ANSWERS_BYTES:
            return None
        each = max((n * v.element_size() * v.numel() for v in values.values()), default=1)
        fit = 0 if self.kinds.trimmed else int((ANSWERS_BYTES - held) // each)
        self.matched = _spread(self.matched, fit)
        answers = [torch.from_numpy(a).to(self.world.device)
                   for a in self._outputs(teacher, self.train_data, self.matched)]
        return _named_tail(answers, self.matched)

    def _onnxruntime_teacher(self, dense: onnx.ModelProto, inputs: Sequence[GraphInput]
                             ) -> _OrtTeacher | None:
        """On CPU, onnxruntime in place of the torch module answering each training batch;
        None when nothing answers each batch (the samples were answered once), off CPU, or
        when onnxruntime cannot take the model: then the torch module is built again."""
        if self.teacher is None or self.world.device.type != "cpu":
            return None
        self.teacher = None
        gc.collect()  # the torch module's weights, before onnxruntime loads its own
        ort = _OrtTeacher.start(dense, inputs, self.matched, self.fixed)
        if ort is None:
            self.teacher = _teacher(dense, self.world.device)
        return ort

    def _draws(self) -> tuple[Batches, np.random.Generator]:
        """The batches and the augmentation draws of one run, the same for every run (the
        learning-rate trials compare like with like). The batches are the same in every process
        (each takes its share); augmentation is drawn per process."""
        seed = self.options.seed
        return (Batches(self.train_data, self.kinds, self.batch,
                        np.random.default_rng([seed, 0xD1])),
                np.random.default_rng([seed, 0xD2, self.world.rank]))

    def _outputs(self, module: OnnxModule, data: Batch, capture: Sequence[str] = ()
                 ) -> list[np.ndarray]:
        """``module``'s outputs on ``data``, a batch at a time, then the ``capture``d
        values (none have a token axis when :attr:`cut_outputs`). When the outputs have no
        token axis (:attr:`cut_outputs`), the samples are batched by length and each batch is
        cut after its last attended column (:func:`trim_padding`), then put back in order:
        all-MiniLM-L6-v2 on 114 fortunes padded to 128 tokens, 2.8 s → 0.6 s an evaluation
        (the same values to 1.4e-7)."""
        order = np.arange(len(data[0]))
        if self.cut_outputs:
            assert self.kinds.mask is not None
            order = np.argsort(attended_lengths(data[self.kinds.mask]), kind="stable")
        parts = []
        for i in range(0, len(order), self.batch):
            idx = torch.from_numpy(order[i:i + self.batch]).to(data[0].device)
            batch = [t[idx] for t in data]
            if self.cut_outputs:
                batch = trim_padding(batch, self.kinds)
            out, mid = _forward(module, _nhwc(batch), list(capture), self.fixed)
            parts.append([o.detach().cpu().numpy()
                          for o in (*out, *(mid[n] for n in capture))])
        back = np.argsort(order)
        return [np.concatenate(p)[back] for p in zip(*parts)]

    def evaluate(self) -> dict[str, float]:
        """The student's fidelity to the teacher on the validation samples, which judge the
        learning rate and early stopping (process 0's, everywhere)."""
        return self._fidelity(self.judge_teacher, self.judge_data)

    def held_out_fidelity(self) -> dict[str, float]:
        """The student's fidelity to the teacher on the held-out split, which only measures."""
        return self._fidelity(self.held_teacher, self.held_data)

    def _fidelity(self, teacher: list[np.ndarray], data: Batch) -> dict[str, float]:
        metrics = None
        if self.world.rank == 0:
            self.student.eval()
            with torch.no_grad():
                real = None if self.kinds.mask is None else data[self.kinds.mask].cpu().numpy()
                metrics = fidelity.compare(teacher, self._outputs(self.student, data), real)
            self.student.train()
        return self.world.decide(metrics)

    def choose_lr(self, steps: int | None, seconds: float | None) -> tuple[float, Runs, Runs, Runs]:
        """Each of :data:`LR_TRIALS` trains a short trial from the start, and :func:`pick_lr`
        picks one on the validation runs (process 0's choice, everywhere). When
        :meth:`check_steps` allows, the pick and the next larger rate (none when the pick is
        the largest) each train that many steps from the start, and the more faithful wins
        (MiniLM heads+MLP 0.3, held-out text: 30-step trials favour 3e-5 over 1e-4, yet 1e-4
        leads from 150 steps on, 0.9591 against 0.9582, and at 1500 steps 0.9661 against
        0.9640; 3e-4 never gains).
        When the checks ran, so does the matched-value weight's (:meth:`_choose_weight`).
        Returns the rate, the trials' fidelity, the checks' and the weight checks' (empty when
        none ran)."""
        trial_steps = TRIAL_STEPS if steps is None else max(1, min(TRIAL_STEPS, steps // 5))
        trial_seconds = None if seconds is None else seconds / (4 * len(LR_TRIALS))
        results: Runs = {}
        ran, spent = 0, 0.0
        for lr in LR_TRIALS:
            began = time.monotonic()
            n, _ = self._run(lr, trial_steps, trial_seconds, f"lr trial {lr:g}", evaluate=False)
            ran, spent = ran + n, spent + time.monotonic() - began
            results[lr] = self.evaluate()
        lr = pick_lr(self.start_fidelity, results)
        larger = [x for x in LR_TRIALS if x > lr]
        check = self.check_steps(steps, seconds, self.world.decide(spent / max(ran, 1)))
        weigh = bool(self.matched) and self.options.matched_weight is None
        if not check or not (larger or weigh):
            return lr, results, {}, {}
        checks: Runs = {}
        for x in (lr, *larger[:1]):  # the largest rate alone: the weight check's base
            self._run(x, check, None, f"lr check {x:g}", evaluate=False)
            checks[x] = self.evaluate()
        if larger and fidelity.better(checks[larger[0]], checks[lr]):
            lr = larger[0]
        weights = self._choose_weight(lr, check, checks[lr]) if weigh else {}
        return lr, results, checks, weights

    def _choose_weight(self, lr: float, check: int, base: dict[str, float]) -> Runs:
        """After the learning rate's checks (``base`` the chosen rate's), the matched-value loss
        weight :data:`MATCHED_HEAVY` trains one more ``check`` steps at ``lr`` and replaces
        :data:`MATCHED_WEIGHT` when it ends more faithful on the validation runs
        (all-MiniLM-L6-v2 heads+MLP 0.3, 1500 steps: held-out-text cosine 0.9673 at 0.1,
        0.9682 at 1, 0.9694 at 10 and at 30; on the residual MLP of tests/test_recover.py the
        check keeps 0.1). Returns both weights' check fidelity."""
        self.matched_weight = MATCHED_HEAVY
        self._run(lr, check, None, f"weight check {MATCHED_HEAVY:g}", evaluate=False)
        checks = {MATCHED_WEIGHT: base, MATCHED_HEAVY: self.evaluate()}
        if not fidelity.better(checks[MATCHED_HEAVY], base):
            self.matched_weight = MATCHED_WEIGHT
        return checks

    @staticmethod
    def check_steps(steps: int | None, seconds: float | None, step_seconds: float) -> int:
        """The steps of each check: :data:`CHECK_SHARE` of the budget (a time budget at the
        trials' pace, ``step_seconds`` a step), 0 when under :data:`CHECK_MIN_STEPS`."""
        parts = [] if steps is None else [steps * CHECK_SHARE]
        if seconds is not None:
            parts.append(seconds * CHECK_SHARE / max(step_seconds, 1e-9))
        n = int(min(parts)) if parts else 0
        return n if n >= CHECK_MIN_STEPS else 0

    def train(self, lr: float, steps: int | None, seconds: float | None
              ) -> tuple[int, dict[str, float]]:
        """The full run; the student ends in its most faithful state. Returns the steps run
        and that state's held-out fidelity."""
        return self._run(lr, steps, seconds, "recover", evaluate=True)

    def _run(self, lr: float, steps: int | None, seconds: float | None, desc: str, *,
             evaluate: bool) -> tuple[int, dict[str, float]]:
        self._load(self.start_state)
        self.batches, self.rng = self._draws()
        params = [p for p in self.student.parameters() if p.requires_grad]
        # fused: one kernel over all parameters (the default loops tensor by tensor on CPU:
        # about a tenth of an all-MiniLM-L6-v2 step); the same update
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.options.weight_decay,
                                fused=self.world.device.type in FUSED_DEVICES)
        best, best_state, stale, next_eval = self.start_fidelity, self.start_state, 0, 1
        start, ran = time.monotonic(), 0
        bar = progress(_counter(steps), desc, total=steps, unit="step")
        for step in bar:
            done = self._done(step, steps, start, seconds)
            if done >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * done))
            loss = self._step(opt)
            ran = step + 1
            if not evaluate or self._done(ran, steps, start, seconds) * EVALUATIONS < next_eval:
                continue
            next_eval += 1
            metrics = self.evaluate()
            _postfix(bar, ran, loss, metrics)
            if fidelity.better(metrics, best):
                best, best_state, stale = metrics, _state(self.student), 0
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
        if evaluate:
            self._load(best_state)
        return ran, best

    def _done(self, step: int, steps: int | None, start: float, seconds: float | None) -> float:
        """How much of the budget is spent, in [0, 1] (process 0's clock)."""
        parts = [] if steps is None else [step / max(steps, 1)]
        if seconds is not None:
            parts.append(self.world.decide((time.monotonic() - start) / max(seconds, 1e-9)))
        return min(max(parts), 1.0)

    def _batch(self) -> tuple[torch.Tensor, Batch]:
        """The next training batch: this process's samples (indices) and their inputs, cut
        and augmented."""
        idx = self.batches.next()
        mine = torch.from_numpy(np.sort(idx[self.world.rank::self.world.size]))
        batch = trim_padding([t[mine.to(t.device)] for t in self.train_data], self.kinds)
        return mine, _nhwc(augment(batch, self.kinds, self.rng, self.options.token_dropout))

    def _step(self, opt: torch.optim.Optimizer) -> float:
        mine, batch = self._batch()
        if self.answers is not None:
            at = mine.to(self.world.device)
            t_out = tuple(a[at] for a in self.answers[0])
            t_mid = {n: v[at] for n, v in self.answers[1].items()}
        elif self.ort_teacher is not None:
            t_out, t_mid = self.ort_teacher(batch)
        else:
            assert self.teacher is not None
            with torch.no_grad():
                t_out, t_mid = _forward(self.teacher, batch, self.matched, self.fixed)
        s_out, s_mid = _forward(self.model, batch, self.matched, self.fixed)
        real = None if self.kinds.mask is None else batch[self.kinds.mask] != 0
        # a decoder's caches that lost heads teach nothing head by head: left out
        loss = sum((_output_loss(*attended(s, t, real), self.options.temperature, scores)
                    for s, t, scores in zip(s_out, t_out, self.scores)
                    if t.is_floating_point() and s.shape == t.shape),
                   torch.zeros((), device=self.world.device))
        if self.matched:
            loss = loss + self.matched_weight * matched_loss(s_mid, t_mid, self.matched, real)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.student.params.items():
                p.copy_(state[k])


class _OrtTeacher:
    """The dense model in onnxruntime, answering training batches on CPU: its outputs and the
    ``capture``d values, as the torch module would to float rounding, in about half the time
    (all-MiniLM-L6-v2, 32 sentences of 22 tokens: 0.11 s against 0.21 s). Its threads do not
    spin after a run, so they leave the cores to the student's step."""

    def __init__(self, dense: onnx.ModelProto, inputs: Sequence[GraphInput],
                 capture: list[str], fixed: int | None = None):
        from spa.validate import session

        self.fixed = fixed
        self.inputs = [i.name for i in inputs]
        self.outputs = [o.name for o in dense.graph.output]
        self.capture = capture
        self.session = session(with_outputs(dense, capture), threads=torch.get_num_threads(),
                               spin=False, what="dense model")

    @classmethod
    def start(cls, dense: onnx.ModelProto, inputs: Sequence[GraphInput], capture: list[str],
              fixed: int | None = None) -> _OrtTeacher | None:
        """The teacher in onnxruntime, or None when onnxruntime cannot load it (over 2 GB in
        memory, or an op it lacks): then the torch module answers."""
        try:
            return cls(dense, inputs, capture, fixed)
        except ValidationError as exc:
            log.info("recover: the teacher answers in torch (%s)", exc)
            return None

    def __call__(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        return in_chunks(self._run, batch, self.fixed)

    def _run(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        feed = {n: np.ascontiguousarray(t.numpy()) for n, t in zip(self.inputs, batch)}
        got = [torch.from_numpy(a) for a in self.session.run(self.outputs + self.capture, feed)]
        return _named_tail(got, self.capture)


def judged(calibration: Calibration) -> tuple[Arrays, Arrays]:
    """(training, validation) samples: the validation runs of the training split
    (:func:`spa.calibration.validation_runs`), which never train; the held-out split judges
    instead when the training split is too small to give up runs (under 8 samples).

    Not the held-out split: it is a seeded random share of the samples, so with data in runs
    (views of one photo, lines of one document) its samples share their photo with training
    samples, and it rewards a run that learns the calibration photos. Measured on
    EfficientNet-Lite0 at a 1.5x FLOPs cut, calibrated on views of 28 photos (600 s budget):
    judged on the held-out split, recovery chose 1e-5 and trained 67 steps, held-out agreement
    0.806 → 0.851 but top-1 agreement on 15 other photos 0.542 → 0.511; judged on runs, it chose
    3e-5 and trained 59 steps, held-out agreement fell 0.806 → 0.716, so the start was written
    (0.542). On data in random order it changes little: MNIST test accuracy 0.9912 → 0.9905
    (the start kept), MiniLM held-out-text cosine 0.9412 → 0.9403."""
    runs = validation_runs(sample_count(calibration.train))
    if not runs.any():
        return dict(calibration.train), dict(calibration.held_out)
    return ({k: v[~runs] for k, v in calibration.train.items()},
            {k: v[runs] for k, v in calibration.train.items()})


def pick_lr(start: dict[str, float], results: dict[float, dict[str, float]]) -> float:
    """The learning rate whose trial ended most faithful, or a larger one whose trial gained at
    least :data:`TRIAL_GAIN_SHARE` of its gain over the start. A trial is a few steps (about 10
    on MiniLM in a 300 s budget), where a small rate gains as much as one three times larger that
    keeps gaining over the full run (post-training MiniLM, held-out cosine 0.9227: trials at 1e-5
    and 3e-5 gained +0.00047 and +0.00045; full runs reached 0.9255 at 1e-5 and 0.9261 at 3e-5)."""
    lrs = sorted(results)
    best = lrs[0]
    for lr in lrs[1:]:
        if fidelity.better(results[lr], results[best]):
            best = lr
    gain = {lr: _score(m) - _score(start) for lr, m in results.items()}
    if gain[best] <= 0:
        return best
    return max(lr for lr in lrs if gain[lr] >= TRIAL_GAIN_SHARE * gain[best])


def _score(metrics: dict[str, float]) -> float:
    """Higher is more faithful: the negated KL divergence of class scores (agreement moves in
    steps of one held-out sample, too coarse to weigh gains of a few steps), else the headline
    measure, else the negated relative error."""
    if "kl" in metrics:
        return -metrics["kl"]
    key = fidelity.headline(metrics)
    return key[1] if key else -metrics["relative_error"]


def _forward(module: torch.nn.Module, batch: Batch, capture: list[str],
             fixed: int | None = None) -> Answer:
    """``module``'s outputs and ``capture``d values on ``batch`` (``fixed`` samples at a
    time when its inputs take that many)."""
    def run(part: Batch) -> Answer:
        if capture:
            return module(*part, capture=capture)
        return _as_tuple(module(*part)), {}
    return in_chunks(run, batch, fixed)


def fixed_batch(student: OnnxModule) -> int | None:
    """The batch size the student's inputs fix (:attr:`OnnxModule.fixed_batch`: every batch
    then runs in chunks of that many samples), None when its batch axis is symbolic;
    OptionError when two inputs fix different sizes."""
    sizes = student.fixed_sizes
    if len(set(sizes.values())) > 1:
        raise OptionError(f"the inputs fix different batch sizes {sorted(set(sizes.values()))}: "
                          + ", ".join(f"'{k}' {v}" for k, v in sizes.items()))
    if student.fixed_batch is not None:
        log.info("recover: the inputs take %d sample(s) at a time: every batch runs in chunks "
                 "of that many", student.fixed_batch)
    return student.fixed_batch




def _named_tail(flat: Sequence[torch.Tensor], names: Sequence[str]
                ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """A flat list of a model's outputs followed by its captured ``names``, split in two: the
    outputs, and the captured values by name."""
    k = len(flat) - len(names)
    return tuple(flat[:k]), dict(zip(names, flat[k:]))


def _spread(names: list[str], most: int) -> list[str]:
    """At most ``most`` of ``names``, evenly spread from the first to the last."""
    if len(names) <= most:
        return names
    if most <= 0:
        return []
    return [names[int(i)] for i in np.linspace(0, len(names) - 1, most).round()]


def _teacher(dense: onnx.ModelProto, device: torch.device) -> OnnxModule:
    """The dense model as a frozen torch module."""
    return _channels_last(from_onnx(dense).to(device).eval().requires_grad_(False))


def _channels_last(module: OnnxModule) -> OnnxModule:
    """4-D weights (convolutions) in channels-last memory, as :func:`_nhwc` lays out images:
    PyTorch's CPU convolutions, depthwise ones above all, train faster so (an EfficientNet-Lite0
    step at batch 32, teacher, student and backward: 4.6 → 3.3 s). Values and shapes are
    unchanged."""
    with torch.no_grad():
        for p in itertools.chain(module.parameters(), module.buffers()):
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    return module


def _nhwc(batch: Batch) -> Batch:
    """Float 4-D inputs (images) in channels-last memory; the same values."""
    return [t.contiguous(memory_format=torch.channels_last)
            if t.dim() == 4 and t.is_floating_point() else t for t in batch]


def _counter(steps: int | None) -> Iterator[int]:
    return iter(range(steps)) if steps is not None else itertools.count()


def _postfix(bar: Any, step: int, loss: float, metrics: dict[str, float]) -> None:
    set_postfix = getattr(bar, "set_postfix", None)
    if set_postfix is not None:
        set_postfix(step=step, loss=f"{loss:.4g}", held_out=headline(metrics))


def _state(module: OnnxModule) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.params.items()}


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _tensors(arrays: dict[str, np.ndarray], inputs: Sequence[GraphInput], what: str,
             device: torch.device) -> Batch:
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise OptionError(f"the {what} calibration samples lack the graph input(s) "
                          f"{', '.join(missing)} (have: {', '.join(sorted(arrays))})")
    return [torch.from_numpy(np.ascontiguousarray(arrays[i.name], dtype=i.dtype)).to(device)
            for i in inputs]


# ---- losses ---------------------------------------------------------------------------------
def attended(s: torch.Tensor, t: torch.Tensor, real: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher outputs with a value per token (``[N, T, C]`` beside the ``[N, T]``
    attention mask ``real``) at the attended tokens, ``[K, C]``, as fidelity compares them (a
    decoder's logits at padding teach nothing); other outputs as they are."""
    if fidelity.per_token(s, real):
        return s[real], t[real]
    return s, t


def matched_loss(s: Mapping[str, torch.Tensor], t: Mapping[str, torch.Tensor],
                 names: Sequence[str], real: torch.Tensor | None) -> torch.Tensor:
    """The mean normalised squared error of the matched intermediate values ``names``, each
    with a value per token (a transformer's residual stream) at the attended tokens only."""
    losses = [_nmse(*attended(s[n], t[n], real)) for n in names]
    return sum(losses[1:], losses[0]) / len(losses)


def _output_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, scores: bool
                 ) -> torch.Tensor:
    if scores:
        return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        log_target=True, reduction="batchmean") * temperature ** 2
    if t.dim() < 2:
        return _nmse(s, t)
    cos = F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1).mean()
    return 1.0 - cos + _nmse(s, t)


def _nmse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``‖s − t‖² / ‖t‖²`` (as means), ``t`` a target: one fused kernel each way (matched
    feature maps of a CNN hold tens of millions of values; an elementwise chain of sub, pow and
    mean and its backward cost EfficientNet-Lite0 about a third of each step)."""
    return F.mse_loss(s, t) / (t.detach().square().mean() + 1e-12)
