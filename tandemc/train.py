"""The training recipe (design.md §1): pretraining, the tandem stage, and the router.

Stages, each a run of `train` over a checkpoint:
- `pretrain`: a plain decoder (`primary`, `drafter` or `secondary`) with cross-entropy, or for a small model
  `distil` (λ = 0.5 between ground truth and the primary's distribution).
- `tandem`: the secondary and its projections with the primary frozen; `ce` (Tandem-CE) or `distil`
  (Tandem-Distil), fixed blocks of γ_train.
- `router`: the adaptive-block-length router, regressed onto the total-variation distance between the secondary's
  and the primary's next-token distributions (the probability that a sampled draft is rejected).

Only the trained subtree is optimised; everything else is passed as a frozen argument, so a frozen model stays
bit-identical. Batches are sharded over all local devices along a `data` mesh axis (data parallelism). Training
state (trained parameters, optimiser state, step) is saved atomically every `save_every` steps and on exit, and a
rerun with the same options resumes from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tandemc import model, safetensors_io
from tandemc.atomic import atomic_directory, atomic_file
from tandemc.checkpoint import Checkpoint, save_checkpoint
from tandemc.config import RouterConfig
from tandemc.data import batch_at, tiled_batch_at
from tandemc.errors import TandemcError
from tandemc.params import flatten, init_params, unflatten

STAGES = ("pretrain", "tandem", "router")
DISTIL_WEIGHT = 0.5  # λ between the primary's distribution and the ground truth


@dataclass(frozen=True)
class TrainOptions:
    stage: str = "pretrain"
    model: str = "primary"  # pretrain only: which decoder
    objective: str = "ce"  # "ce" or "distil"
    steps: int = 1000
    batch: int = 32
    seq_len: int = 256
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    block_length: int = 0  # tandem stage: γ_train (0: the checkpoint's)
    seed: int = 0
    save_every: int = 200
    distinct_batches: int = 0  # train on batches 1..N in rotation, the primary's outputs for each computed once
    tiled: bool = False  # with distinct_batches: the batches tile the data (`data.tiled_batch_at`)

    @property
    def reads_primary(self) -> bool:
        """Whether the stage reads the frozen primary (its distribution or its hidden states)."""
        return self.stage != "pretrain" or self.objective == "distil"

    def batch_index(self, step: int) -> int:
        """Which batch of the seed's stream step `step` (1-based) trains on."""
        return (step - 1) % self.distinct_batches + 1 if self.distinct_batches else step

    def tokens(self, stream: np.ndarray, index: int) -> np.ndarray:
        """The token windows [batch, seq_len + 1] of batch `index`."""
        pick = tiled_batch_at if self.tiled else batch_at
        return pick(stream, self.seed, index, self.batch, self.seq_len)

    def validate(self, ckpt: Checkpoint) -> "TrainOptions":
        cfg = ckpt.config
        if self.stage not in STAGES:
            raise TandemcError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.objective not in ("ce", "distil"):
            raise TandemcError(f"unknown objective {self.objective!r}; choose ce or distil")
        if self.stage == "pretrain":
            if self.model not in ("primary", "secondary", "drafter"):
                raise TandemcError(f"--model must be primary, secondary or drafter, got {self.model!r}")
            if self.model == "drafter" and cfg.drafter is None:
                raise TandemcError("this checkpoint has no drafter to train")
            if self.model == "primary" and self.objective == "distil":
                raise TandemcError("the primary cannot be distilled from itself; use --objective ce")
        if self.stage == "router" and cfg.router is None:
            raise TandemcError("this checkpoint has no router; pass --router-hidden N (e.g. 64) to add "
                               "a fresh one")
        for name in ("steps", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise TandemcError(f"--{name.replace('_', '-')} must be positive")
        if self.distinct_batches < 0:
            raise TandemcError("--distinct-batches must be >= 0 (0: a fresh batch every step)")
        if self.tiled and not self.distinct_batches:
            raise TandemcError("--tiled sets how --distinct-batches N are drawn; give N too")
        longest = min(c.max_seq_len for c in (cfg.primary, cfg.secondary))
        if self.seq_len > longest:
            raise TandemcError(f"--seq-len {self.seq_len} exceeds the models' max_seq_len {longest}")
        devices = jax.local_device_count()
        if self.batch % devices:
            raise TandemcError(f"--batch {self.batch} must be a multiple of the {devices} local devices")
        return self

    def trained(self, params) -> tuple[str, ...]:
        """The parameter groups this stage trains (the variant's `tandem_input` only where the checkpoint has it)."""
        groups = {"pretrain": (self.model,), "tandem": ("secondary", "tandem", "tandem_input"),
                  "router": ("router",)}[self.stage]
        return tuple(k for k in groups if k in params)


# --- losses -----------------------------------------------------------------------------------------------------

def _nll(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def objective_loss(logits, targets, teacher, objective: str):
    """Mean loss and accuracy; `distil` mixes in cross-entropy against the teacher's distribution, given as its
    top tokens in the student's ids (`teacher_in_student_ids`)."""
    ce = jnp.mean(_nll(logits, targets))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
    if objective == "ce":
        return ce, accuracy
    probs, ids = teacher
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids, axis=-1)
    soft = -jnp.mean(jnp.sum(probs * logp, axis=-1))
    return (1 - DISTIL_WEIGHT) * ce + DISTIL_WEIGHT * soft, accuracy


def teacher_in_student_ids(params, teacher) -> tuple:
    """The primary's kept top tokens as (probabilities renormalised over them, the drafters' ids of them): with a
    draft vocabulary several tokens may share the id of all others, and sums over ids add them up."""
    return jax.nn.softmax(teacher["top_logits"], axis=-1), model.draft_ids(params, teacher["top_ids"])


def dense(probs, ids, width: int):
    """[..., width] distributions from (probabilities, ids) pairs [..., k]."""
    flat_p, flat_i = probs.reshape(-1, probs.shape[-1]), ids.reshape(-1, ids.shape[-1])
    out = jax.vmap(lambda i, v: jnp.zeros((width,), jnp.float32).at[i].add(v))(flat_i, flat_p)
    return out.reshape(*probs.shape[:-1], width)


def rejection_probability(params, student_logits, teacher):
    """Total variation between what the drafter proposes from (its logits, masked by `model.proposable`) and the
    primary's distribution in the drafter's ids: the probability that a sampled draft is rejected."""
    q = jax.nn.softmax(model.proposable(params, student_logits), axis=-1)
    p = dense(*teacher_in_student_ids(params, teacher), q.shape[-1])
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def router_inputs(params, cfg, x, block=None, teacher=None):
    """Per position: the router's features from the tandem secondary, and the rejection probability it should
    predict (total variation between the secondary's and the primary's next-token distributions)."""
    if teacher is None:
        teacher = primary_outputs(params["primary"], cfg, x, model.primary_layers_read(cfg))
    secondary_logits = model.tandem_forward(params, cfg, x, block, primary_hiddens=teacher["hiddens"])
    features = model.router_features(params, cfg.router, jax.nn.softmax(model.proposable(params, secondary_logits)))
    return features, rejection_probability(params, secondary_logits, teacher)


def teacher_top_k(vocab_size: int) -> int:
    """How many of the primary's most likely tokens a stage keeps per position: all of a small vocabulary (the
    byte-level example: exact distillation), the top 64 of a real one (the rest, typically < 1% of the mass, is
    dropped and the kept part renormalised), so that 49152 logits per position never leave the forward."""
    return vocab_size if vocab_size <= 1024 else 64


def primary_outputs(primary, cfg, x, layers: tuple[int, ...]) -> dict:
    """What a stage reads from the frozen primary for inputs x: its `teacher_top_k` most likely tokens per position
    (`top_logits`, `top_ids`), and its residual streams at `layers` in bfloat16 ({layer: [B, T, d]}; the tandem
    and router stages need those the secondary reads); the other layers are dropped so that a cache of these
    outputs holds only what training needs."""
    logits, hiddens = jax.lax.stop_gradient(model.forward(primary, cfg.primary, x))
    top_logits, top_ids = jax.lax.top_k(logits, teacher_top_k(cfg.primary.vocab_size))
    return {"top_logits": top_logits, "top_ids": top_ids.astype(jnp.int32),
            "hiddens": {layer: hiddens[layer].astype(jnp.bfloat16) for layer in layers}}


class PrimaryOutputCache:
    """The frozen primary's outputs per batch index on disk (`--primary-cache`), so that every run over the same
    primary, data and batches computes them once: the four stage-1 runs of the example and its router share them.

    Entries live under a fingerprint of everything they depend on (the primary's config and weights, the layers
    kept, the training tokens, seed, batch and sequence length), so a changed input never reads stale outputs. Each
    entry is written atomically (`atomic_file`)."""

    def __init__(self, root: Path, primary, cfg, layers: tuple[int, ...], corpus_train: np.ndarray,
                 opts: TrainOptions):
        digest = hashlib.sha256()
        described = {"primary": dataclasses.asdict(cfg.primary), "layers": list(layers), "seed": opts.seed,
                     "batch": opts.batch, "seq_len": opts.seq_len, "tokens": len(corpus_train)}
        if opts.tiled:  # a key only where set, so that the caches of earlier runs stay valid
            described["tiled"] = True
        digest.update(json.dumps(described, sort_keys=True).encode())
        for name, value in sorted(flatten(primary).items()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(np.asarray(value)).tobytes())
        digest.update(np.ascontiguousarray(corpus_train).tobytes())
        self.dir = Path(root) / digest.hexdigest()[:20]
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "made-for.json").is_file():
            with atomic_file(self.dir / "made-for.json") as tmp:
                tmp.write_text(json.dumps(described, indent=2))

    def _file(self, index: int) -> Path:
        return self.dir / f"batch-{index:06d}.safetensors"

    def get(self, index: int) -> dict | None:
        if not self._file(index).is_file():
            return None
        tensors = safetensors_io.read(self._file(index))
        return {"top_logits": tensors["top_logits"], "top_ids": tensors["top_ids"],
                "hiddens": {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("hiddens.")}}

    def put(self, index: int, outputs: dict) -> None:
        tensors = {"top_logits": np.asarray(outputs["top_logits"]), "top_ids": np.asarray(outputs["top_ids"])}
        tensors.update({f"hiddens.{layer}": np.asarray(v) for layer, v in outputs["hiddens"].items()})
        with atomic_file(self._file(index)) as tmp:
            safetensors_io.write(tmp, tensors)


def make_loss(cfg, opts: TrainOptions):
    """loss(trained, frozen, tokens, teacher) → (loss, accuracy); `trained` and `frozen` are disjoint parts of the
    params, `teacher` the frozen primary's outputs for these tokens (`primary_outputs`; None where not read)."""
    block = opts.block_length or cfg.gamma_train

    def loss(trained, frozen, tokens, teacher):
        params = {**frozen, **trained}
        x, y = tokens[:, :-1], tokens[:, 1:]
        soft = None if teacher is None or opts.objective == "ce" else teacher_in_student_ids(params, teacher)
        if opts.stage == "pretrain" and opts.model == "primary":
            return objective_loss(model.forward(params["primary"], cfg.primary, x)[0], y, None, "ce")
        if opts.stage == "pretrain":  # a drafter reads and predicts its own ids
            logits, _ = model.drafter_forward(params, cfg, opts.model, x)
            return objective_loss(logits, model.draft_ids(params, y), soft, opts.objective)
        if opts.stage == "tandem":
            logits = model.tandem_forward(params, cfg, x, block, primary_hiddens=teacher["hiddens"])
            return objective_loss(logits, model.draft_ids(params, y), soft, opts.objective)
        features, target = jax.lax.stop_gradient(router_inputs(params, cfg, x, block, teacher))
        predicted = model.router_reject_probability(params["router"], features)
        bce = -jnp.mean(target * jnp.log(predicted + 1e-7) + (1 - target) * jnp.log(1 - predicted + 1e-7))
        return bce, jnp.mean(jnp.abs(predicted - target))

    return loss


def make_optimizer(opts: TrainOptions):
    schedule = optax.warmup_cosine_decay_schedule(0.0, opts.lr, min(opts.warmup, opts.steps - 1), opts.steps,
                                                  end_value=opts.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=opts.weight_decay))


# --- training state on disk ---------------------------------------------------------------------------------------

STATE_FILE, STATE_META = "state.safetensors", "state.json"


def save_state(path: Path, trained, opt_state, step: int, opts: TrainOptions) -> None:
    leaves = jax.tree_util.tree_leaves(opt_state)
    tensors = {f"params.{k}": np.asarray(v) for k, v in flatten(trained).items()}
    tensors.update({f"opt.{i:05d}": np.asarray(v) for i, v in enumerate(leaves)})
    with atomic_directory(path, force=True) as tmp:
        safetensors_io.write(tmp / STATE_FILE, tensors)
        (tmp / STATE_META).write_text(json.dumps({"step": step, "options": dataclasses.asdict(opts)}, indent=2))


def load_state(path: Path, opt_state_template, opts: TrainOptions):
    meta = json.loads((path / STATE_META).read_text())
    saved = {**dataclasses.asdict(TrainOptions()), **meta["options"]}  # fields added since keep their defaults
    if saved != dataclasses.asdict(opts):
        changed = sorted(k for k, v in dataclasses.asdict(opts).items() if saved.get(k) != v)
        raise TandemcError(f"training state in {path} was saved with different options ({', '.join(changed)}); "
                           "rerun with the same options to resume, or delete the state directory")
    tensors = safetensors_io.read(path / STATE_FILE)
    trained = unflatten({k[len("params."):]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("params.")})
    template, treedef = jax.tree_util.tree_flatten(opt_state_template)
    leaves = [jnp.asarray(tensors[f"opt.{i:05d}"]) for i in range(len(template))]
    return trained, jax.tree_util.tree_unflatten(treedef, leaves), meta["step"]


# --- the loop -------------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr: step, loss, accuracy, tokens/s, time left."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.first_step = None

    def update(self, step: int, loss: float, accuracy: float, tokens: int) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.start = step, now
            return
        rate = (step - self.first_step) / max(now - self.start, 1e-9)
        left = (self.total - step) / max(rate, 1e-9)
        line = (f"{self.label} step {step}/{self.total}  loss {loss:.4f}  acc {accuracy:.3f}  "
                f"{rate * tokens / 1e3:.1f}k tok/s  {int(left // 60)}m{int(left % 60):02d}s left")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


@dataclass
class TrainResult:
    params: dict
    step: int
    history: list  # (step, loss, accuracy)
    seconds: float


def train(ckpt: Checkpoint, corpus_train: np.ndarray, opts: TrainOptions, state_dir: Path | None = None,
          log_every: int = 20, progress: bool = True, stop_after: int | None = None,
          primary_cache: Path | None = None) -> TrainResult:
    """Run (or resume) one stage; returns the full parameter tree with the trained part updated.

    `stop_after` ends this run after that many steps with its state saved (time-boxed runs); the result's `step`
    says how far training got. `primary_cache` is a directory for the frozen primary's outputs shared between runs
    (`PrimaryOutputCache`); it changes no result, only how often they are computed."""
    opts = opts.validate(ckpt)
    cfg = dataclasses.replace(ckpt.config, gamma_train=opts.block_length or ckpt.config.gamma_train) \
        if opts.stage == "tandem" else ckpt.config
    params = jax.tree.map(jnp.asarray, ckpt.params)
    trained = {k: params[k] for k in opts.trained(params)}
    frozen = {k: v for k, v in params.items() if k not in trained}

    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    optimizer = make_optimizer(opts)
    loss_fn = make_loss(cfg, opts)

    def step_fn(trained, opt_state, frozen, tokens, teacher):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained, frozen, tokens, teacher)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, loss, accuracy

    train_step = jax.jit(step_fn, in_shardings=(replicated, replicated, replicated, sharded, sharded),
                         out_shardings=(replicated, replicated, replicated, replicated), donate_argnums=(0, 1))
    # A pretraining stage reads only the logits; with a shared cache it keeps the layers a tandem stage reads too.
    layers = model.primary_layers_read(cfg) if opts.stage != "pretrain" or primary_cache else ()
    teacher_of = jax.jit(lambda frozen, tokens: primary_outputs(frozen["primary"], cfg, tokens[:, :-1], layers),
                         in_shardings=(replicated, sharded), out_shardings=sharded)
    disk = PrimaryOutputCache(primary_cache, params["primary"], cfg, layers, corpus_train, opts) \
        if primary_cache and opts.reads_primary else None
    teachers = {}  # batch index → the primary's outputs, kept while batches repeat (--distinct-batches)

    def teacher_at(index, tokens):
        if not opts.reads_primary:
            return None
        if index in teachers:
            return teachers[index]
        outputs = disk.get(index) if disk else None
        if outputs is None:
            outputs = teacher_of(frozen, tokens)
            if disk:
                disk.put(index, outputs)
        else:
            outputs = jax.device_put(outputs, sharded)
        if opts.distinct_batches:
            teachers[index] = outputs
        return outputs

    opt_state = optimizer.init(trained)
    start = 0
    if state_dir is not None and (state_dir / STATE_META).is_file():
        trained, opt_state, start = load_state(state_dir, opt_state, opts)
    trained, opt_state, frozen = jax.device_put((trained, opt_state, frozen), replicated)

    bar = Progress(opts.steps, f"[{opts.stage} {'/'.join(trained)}]") if progress else None
    history, began, completed = [], time.perf_counter(), start
    last = opts.steps if stop_after is None else min(opts.steps, start + stop_after)
    if state_dir is None and last < opts.steps:
        raise TandemcError("stopping early needs a state directory to resume from")
    try:
        for step in range(start + 1, last + 1):
            index = opts.batch_index(step)
            tokens = jax.device_put(opts.tokens(corpus_train, index), sharded)
            trained, opt_state, loss, accuracy = train_step(trained, opt_state, frozen, tokens,
                                                            teacher_at(index, tokens))
            completed = step
            if step % log_every == 0 or step == last or step == start + 1:
                history.append((step, float(loss), float(accuracy)))
                if bar:
                    bar.update(step, *history[-1][1:], opts.batch * opts.seq_len)
                if not np.isfinite(history[-1][1]):
                    raise TandemcError(f"the loss became {history[-1][1]} at step {step}; lower --lr")
            if state_dir is not None and step % opts.save_every == 0 and step < opts.steps:
                save_state(state_dir, trained, opt_state, step, opts)
    except KeyboardInterrupt:
        if state_dir is not None and completed > start:
            save_state(state_dir, trained, opt_state, completed, opts)
        raise
    finally:
        if bar:
            bar.close()
    if state_dir is not None:
        save_state(state_dir, trained, opt_state, completed, opts)
    out = {**params, **jax.tree.map(np.asarray, trained)}
    return TrainResult(jax.tree.map(np.asarray, out), completed, history, time.perf_counter() - began)


def save_trained(path: Path, ckpt: Checkpoint, result: TrainResult, opts: TrainOptions, force: bool) -> None:
    cfg = ckpt.config
    if opts.stage == "tandem" and opts.block_length:
        cfg = dataclasses.replace(cfg, gamma_train=opts.block_length)
    tokenizer_file = ckpt.path / cfg.tokenizer.file if cfg.tokenizer.type == "hf" else None
    save_checkpoint(path, cfg, result.params, tokenizer_file=tokenizer_file, force=force)


def initialise_secondary_from_drafter(ckpt: Checkpoint) -> Checkpoint:
    """Stage 1 starts the tandem secondary from a standalone secondary: copy the drafter's weights."""
    if ckpt.config.drafter is None:
        raise TandemcError("--init-secondary-from-drafter needs a checkpoint with a drafter")
    if ckpt.config.drafter != ckpt.config.secondary:
        raise TandemcError("--init-secondary-from-drafter needs the drafter and secondary configs to be identical")
    params = {**ckpt.params, "secondary": jax.tree.map(np.copy, ckpt.params["drafter"])}
    if "tandem_input" in params:  # the variant's MLP starts silent: the tandem starts as the standalone secondary
        params["tandem_input"] = _silenced(params["tandem_input"])
    return dataclasses.replace(ckpt, params=params)


def _silenced(tandem_input: dict) -> dict:
    """The variant's MLP with its output layers (and the feedback) zero: it adds nothing until trained."""
    return {k: np.zeros_like(v) if k in ("w_out", "w_logits", "w_feedback") else v for k, v in tandem_input.items()}


def with_primary_state_input(ckpt: Checkpoint, width: int, seed: int = 0, logits: bool = False,
                             layers: tuple[int, ...] = (), feedback: bool = False) -> Checkpoint:
    """Switch on the primary-state-input variant: an MLP of hidden `width` reading the primary `layers` (default:
    the last; feeding the logits too with `logits`; carried through the block by the secondary's own state with
    `feedback`), its output layers zero so that the tandem starts exactly as it was and training decides what the
    primary's state adds."""
    cfg = ckpt.config
    wanted = dataclasses.replace(cfg, primary_state_input=width, primary_state_logits=logits,
                                 primary_state_layers=layers, primary_state_feedback=feedback)

    def settings(c):  # state_layers, not primary_state_layers: the last layer named or left to the default
        return c.primary_state_input, c.primary_state_logits, c.state_layers, c.primary_state_feedback

    if settings(cfg) == settings(wanted):
        return ckpt
    if cfg.primary_state_input:
        raise TandemcError(f"this checkpoint already has primary_state_input {cfg.primary_state_input} "
                           f"(primary_state_logits {str(cfg.primary_state_logits).lower()}, layers "
                           f"{list(cfg.state_layers)}, primary_state_feedback "
                           f"{str(cfg.primary_state_feedback).lower()}); drop --primary-state-input or pass the same "
                           "settings")
    wanted.validate()
    fresh = _silenced(init_params(wanted, seed, only="tandem_input.")["tandem_input"])
    return dataclasses.replace(ckpt, config=wanted, params={**ckpt.params, "tandem_input": fresh})


def with_router(ckpt: Checkpoint, hidden: int, seed: int = 0) -> Checkpoint:
    """Add a fresh router of this hidden width to a checkpoint that has none (an imported primary's tandem), so
    that the router stage can train it; a checkpoint that has one keeps it."""
    cfg = ckpt.config
    if cfg.router is not None:
        if cfg.router.hidden != hidden:
            raise TandemcError(f"this checkpoint already has a router of hidden width {cfg.router.hidden}; drop "
                               f"--router-hidden or pass {cfg.router.hidden}")
        return ckpt
    cfg = dataclasses.replace(cfg, router=RouterConfig(hidden=hidden)).validate()
    return dataclasses.replace(ckpt, config=cfg, params={**ckpt.params,
                                                         "router": init_params(cfg, seed, only="router.")["router"]})


# one program, not op by op (fitting on the example: 15 s → 10 s)
_forward = jax.jit(model.forward, static_argnums=1)
_drafter_forward = jax.jit(model.drafter_forward, static_argnums=(1, 2))


def fit_projections(ckpt: Checkpoint, tokens: np.ndarray, ridge: float = 1e-3) -> Checkpoint:
    """Initialise each FF_j by least squares so that FF_j(rms(h_primary^ℓ(j))) reproduces the secondary's own
    normalised input to layer j (what its W_k, W_v read) at the same positions.

    With random projections the tandem secondary starts out blind to everything before its block; fitted ones start
    it close to the standalone secondary it was initialised from, and training then only has to learn what the
    primary's representations add.
    """
    cfg = ckpt.config
    params = jax.tree.map(jnp.asarray, ckpt.params)
    primary_hiddens = _forward(params["primary"], cfg.primary, tokens)[1]
    secondary = params["secondary"]
    stream = [model.drafter_embed(params, "secondary", tokens)] + _drafter_forward(params, cfg, "secondary", tokens)[1]
    fitted = []
    for j, source in enumerate(cfg.layer_map):
        x = model.rms_norm(primary_hiddens[source], None, cfg.primary.norm_eps).reshape(-1, cfg.primary.d_model)
        x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1).astype(jnp.float32)
        y = model.rms_norm(stream[j], secondary["layers"][j]["attn_norm"], cfg.secondary.norm_eps)
        y = y.reshape(-1, cfg.secondary.d_model).astype(x.dtype)
        solution = jnp.linalg.solve(x.T @ x + ridge * x.shape[0] * jnp.eye(x.shape[1], dtype=x.dtype), x.T @ y)
        dtype = ckpt.params["tandem"][j]["weight"].dtype
        fitted.append({"weight": np.asarray(solution[:-1], dtype), "bias": np.asarray(solution[-1], dtype)})
    return dataclasses.replace(ckpt, params={**ckpt.params, "tandem": fitted})


def choose_router_threshold(ckpt: Checkpoint, windows: np.ndarray, draft_cost: float = 0.0
                            ) -> tuple[float, dict]:
    """Pick the router's stopping threshold τ on held-out windows by expected cost per draft position.

    Stopping before a draft that would have been accepted loses about one token (a primary call); drafting one
    that is rejected wastes one secondary step, whose cost relative to a primary step, c, is `draft_cost` when given
    (measured on the target: `tandemc run --profile` shows a step's time by draft) and otherwise the models'
    parameter ratio, which is right where both are weight-bandwidth-bound and too low where the drafter is bound by
    per-operator overhead (a small drafter on a CPU). With the rejection probability given by the total-variation distance, the expected cost of τ
    is Σ_stopped (1 − TV) + c · Σ_drafted TV; a calibrated router's optimum is τ = 1/(1 + c) (the paper's 0.8 is
    c = 0.25).
    """
    cfg = ckpt.config
    params = jax.tree.map(jnp.asarray, ckpt.params)
    features, reject = router_inputs(params, cfg, jnp.asarray(windows[:, :-1]))
    predicted = np.asarray(model.router_reject_probability(params["router"], features)).ravel()
    reject = np.asarray(reject).ravel()
    c = draft_cost or max(cfg.secondary.num_parameters() / cfg.primary.num_parameters(), 0.02)
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    costs = [float(np.sum(np.where(predicted > t, 1 - reject, c * reject))) / len(reject) for t in grid]
    best = float(grid[int(np.argmin(costs))])
    return best, {"cost_ratio": c, "expected_cost": min(costs), "mean_predicted": float(predicted.mean()),
                  "mean_total_variation": float(reject.mean())}


def with_router_threshold(ckpt: Checkpoint, params, corpus, seq_len: int, draft_cost: float = 0.0
                          ) -> tuple[Checkpoint, dict]:
    """The checkpoint's config with the router threshold chosen on held-out windows, and the choice's report."""
    from tandemc.data import evaluation_windows

    stream = corpus.held_out if len(corpus.held_out) > seq_len + 1 else corpus.train
    threshold, report = choose_router_threshold(dataclasses.replace(ckpt, params=params),
                                                evaluation_windows(stream, seq_len, 16), draft_cost)
    return dataclasses.replace(ckpt, config=ckpt.config.with_router_threshold(threshold)), \
        {"router_threshold": threshold, **report}
