"""The `tandemc` command line. Every command has --help and --json; user errors print one line and exit 2."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import click

from tandemc import __version__
from tandemc.errors import TandemcError


class _Group(click.Group):
    """Every failure is one `error:` line: user errors and what the system refused (permissions, a full or
    read-only disk, missing paths) exit 2; anything else is tandemc's own bug and exits 3 asking for --debug,
    which shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # one line too, instead of click's usage block
            click.echo(f"error: {e.format_message()}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            code, message = _one_line(e)
            click.echo(f"error: {message}", err=True)
            ctx.exit(code)


def _one_line(e: BaseException) -> tuple[int, str]:
    """(exit status, message) for an exception that reached the command line."""
    if isinstance(e, TandemcError):
        return 2, " ".join(str(e).split("\n"))
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return 2, f"{e.strerror or e.__class__.__name__}{where}"
    if isinstance(e, MemoryError):
        return 2, "out of memory: the input asks for more than this machine holds (check the sizes in its config)"
    if isinstance(e, RecursionError):
        return 2, "input nested too deeply to read"
    return 3, f"internal error ({e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); " \
              "rerun with --debug for the traceback and report it"


def _emit(as_json: bool, data: dict, human: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else human)


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def sampling_options(fn):
    for option in reversed([
        click.option("--temperature", "-t", default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (1: off)."),
        click.option("--seed", default=0, show_default=True),
    ]):
        fn = option(fn)
    return fn


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tandemc")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
def cli(debug):
    """tandemc: compile Tandem Transformer checkpoints (primary + tandem secondary) for deployment."""


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", help="Named configuration (tiny, small, 100m, 1b).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="A config.json to initialise from instead of a preset.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed for the weights.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@json_option
def init(out, preset, config_file, seed, force, as_json):
    """Write a randomly initialised checkpoint to OUT."""
    from tandemc.checkpoint import read_config, save_checkpoint
    from tandemc.config import preset as get_preset
    from tandemc.params import init_params

    if (preset is None) == (config_file is None):
        raise TandemcError("give exactly one of --preset NAME or --config FILE")
    if preset:
        cfg = get_preset(preset).validate()
    else:
        if not config_file.is_file():
            raise TandemcError(f"config file {config_file} does not exist")
        cfg = read_config(config_file)
    if cfg.tokenizer.type != "byte":
        raise TandemcError("init writes byte-tokenizer checkpoints; set tokenizer.type to 'byte'")
    params = init_params(cfg, seed)
    save_checkpoint(out, cfg, params, force=force)
    counts = _parameter_counts(params)
    _emit(as_json, {"path": str(out), "parameters": counts},
          f"wrote {out} ({', '.join(f'{k} {_human(v)}' for k, v in counts.items())} parameters)")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def inspect(path, as_json):
    """Describe a checkpoint (parameters, shapes, layer map, bytes) or an artifact (target, graphs, verification)."""
    from tandemc.artifact import MANIFEST
    from tandemc.checkpoint import inspect_checkpoint

    if (path / MANIFEST).is_file():
        return _inspect_artifact(path, as_json)

    cfg, header = inspect_checkpoint(path)
    by_model: Counter = Counter()
    by_dtype: Counter = Counter()
    for name, entry in header.items():
        n = 1
        for dim in entry["shape"]:
            n *= dim
        by_model[name.split(".", 1)[0]] += n
        by_dtype[entry["dtype"]] += entry["data_offsets"][1] - entry["data_offsets"][0]
    models = {}
    for name in ("primary", "secondary", "drafter"):
        m = getattr(cfg, name)
        if m:
            models[name] = {"parameters": by_model[name], "layers": m.n_layers, "d_model": m.d_model,
                            "heads": m.n_heads, "kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "d_ff": m.d_ff,
                            "vocab_size": m.vocab_size, "tied_embeddings": m.tie_embeddings,
                            "max_seq_len": m.max_seq_len}
    data = {"path": str(path), "schema_version": cfg.schema_version, "dtype": cfg.dtype, "models": models,
            "tandem_parameters": by_model["tandem"], "router_parameters": by_model["router"],
            "primary_state_input": cfg.primary_state_input, "primary_state_logits": cfg.primary_state_logits,
            "primary_state_layers": list(cfg.state_layers) if cfg.primary_state_input else [],
            "primary_state_feedback": cfg.primary_state_feedback,
            "primary_state_input_parameters": by_model["tandem_input"],
            "layer_map": list(cfg.layer_map), "gamma_train": cfg.gamma_train, "tokenizer": cfg.tokenizer.type,
            "bytes_by_dtype": dict(by_dtype), "total_parameters": sum(by_model.values())}
    lines = [f"{path}: tandem checkpoint (schema {cfg.schema_version}, {cfg.dtype}, tokenizer {cfg.tokenizer.type})"]
    for name, m in models.items():
        lines.append(f"  {name:9s} {_human(m['parameters']):>7s} params  {m['layers']} layers  d={m['d_model']}  "
                     f"heads {m['heads']}/{m['kv_heads']} kv x {m['head_dim']}  ff={m['d_ff']}  vocab {m['vocab_size']}"
                     f"{'  tied' if m['tied_embeddings'] else ''}")
    lines.append(f"  tandem    {_human(by_model['tandem']):>7s} params  layer map (secondary j <- primary l(j)): "
                 f"{list(cfg.layer_map)}  gamma_train {cfg.gamma_train}")
    if cfg.primary_state_input:
        lines.append(f"  state-in  {_human(by_model['tandem_input']):>7s} params  primary-state-input variant, "
                     f"hidden {cfg.primary_state_input}, reads primary layers {list(cfg.state_layers)}"
                     f"{', into the logits too' if cfg.primary_state_logits else ''}"
                     f"{', carried through the block by the secondary' if cfg.primary_state_feedback else ''}")
    if cfg.router:
        lines.append(f"  router    {_human(by_model['router']):>7s} params  top_k {cfg.router.top_k}  "
                     f"hidden {cfg.router.hidden}  threshold {cfg.router.threshold}")
    lines.append("  bytes:    " + ", ".join(f"{k} {_bytes(v)}" for k, v in sorted(by_dtype.items())))
    _emit(as_json, data, "\n".join(lines))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--mode", type=click.Choice(["speed", "tandem", "adaptive", "primary", "vanilla"]), default="speed",
              show_default=True, help="speed: exact draft-verify; tandem: standalone Tandem; adaptive: speed with "
              "router-gated block length (up to γ); primary: primary only; vanilla: SPEED with the standalone drafter.")
@click.option("--block-length", "-g", type=int, help="Draft block length γ [default: the checkpoint's gamma_train].")
@click.option("--max-new-tokens", "-n", default=64, show_default=True)
@sampling_options
@click.option("--max-seq-len", type=int, help="Cache length [default: the models' max_seq_len].")
@click.option("--stats", is_flag=True, help="Print decoding statistics to stderr.")
@click.option("--chat", is_flag=True, help="Send the prompt as a user turn through the model's chat template.")
@json_option
def generate(checkpoint, prompt, mode, block_length, max_new_tokens, temperature, top_k, top_p, seed, max_seq_len,
             stats, chat, as_json):
    """Generate text with the JAX reference decoder."""
    import jax

    from tandemc.checkpoint import load_checkpoint
    from tandemc.decoding import generate as run
    from tandemc.sampling import check_sampling

    check_sampling(temperature, top_k, top_p)
    ckpt = load_checkpoint(checkpoint)
    params = jax.tree.map(jax.numpy.asarray, ckpt.params)
    tok = ckpt.tokenizer
    ids = _prompt_ids(prompt, chat, ckpt.config, tok)
    start = time.perf_counter()
    result = run(params, ckpt.config, [ids], mode=mode, block_length=block_length,
                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 eos_id=tok.eos_id, max_seq_len=max_seq_len)
    seconds = time.perf_counter() - start
    tokens = result.tokens[0]
    run_stats = {**result.stats, "seconds": round(seconds, 4)}
    text = tok.decode(tokens)
    if as_json:
        _emit(True, {"tokens": tokens, "text": text, "stats": run_stats, "mode": mode}, "")
        return
    click.echo(text)
    if stats:
        click.echo(_format_stats(run_stats), err=True)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Checkpoint to write.")
@click.option("--stage", type=click.Choice(["pretrain", "tandem", "router"]), required=True)
@click.option("--model", "model_name", type=click.Choice(["primary", "secondary", "drafter"]), default="primary",
              show_default=True, help="pretrain: the decoder to train.")
@click.option("--objective", type=click.Choice(["ce", "distil"]), default="ce", show_default=True,
              help="distil: 0.5 ground truth + 0.5 the primary's distribution.")
@click.option("--data", default="stdlib", show_default=True, help="Text file, directory, or 'stdlib'.")
@click.option("--steps", default=1000, show_default=True)
@click.option("--batch", default=32, show_default=True, help="Global batch, split over local devices.")
@click.option("--seq-len", default=256, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--warmup", default=100, show_default=True)
@click.option("--block-length", "-g", default=0, help="tandem/router: γ_train [default: the checkpoint's].")
@click.option("--init-secondary-from-drafter", is_flag=True,
              help="tandem: start the secondary from the standalone drafter's weights (same shape).")
@click.option("--init-projections", type=click.Choice(["random", "fit"]), default="random", show_default=True,
              help="tandem: keep the checkpoint's projections (random at init, as in the paper) or fit them by least "
              "squares to reproduce the secondary's own layer inputs.")
@click.option("--primary-state-input", type=click.IntRange(min=0), default=0,
              help="tandem: switch on the variant that feeds the primary's last-layer state before each block into "
              "the secondary's input through an MLP of this hidden width (docs/training.md) [default: off].")
@click.option("--primary-state-logits", is_flag=True,
              help="tandem, with --primary-state-input: that MLP feeds the secondary's logits too.")
@click.option("--primary-state-layers", metavar="L1,L2,..",
              help="tandem, with --primary-state-input: the primary layers that MLP reads, side by side [default: "
              "the last].")
@click.option("--primary-state-feedback", is_flag=True,
              help="tandem, with --primary-state-input: each draft after a block's first also feeds its "
              "predecessor's last-layer state into that MLP, carrying the primary's state through the block.")
@click.option("--router-hidden", type=click.IntRange(min=1),
              help="router: add a fresh router of this hidden width when the checkpoint has none (an imported "
              "primary's tandem).")
@click.option("--draft-cost", type=click.FloatRange(min=0.0, min_open=True),
              help="router: one draft's cost relative to a primary step on the target, for choosing the stopping "
              "threshold (measure it with `tandemc run --profile`) [default: the models' parameter ratio].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--distinct-batches", type=click.IntRange(min=0), default=0, show_default=True,
              help="Train on the first N batches of the seed's stream in rotation, computing the frozen primary's "
                   "outputs for each once and keeping them in memory (0: a fresh batch every step).")
@click.option("--tiled", is_flag=True,
              help="With --distinct-batches: the batches tile the data with non-overlapping windows in a seeded "
                   "order, so that N batches see N x batch x seq-len distinct tokens (random windows overlap).")
@click.option("--primary-cache", type=click.Path(file_okay=False, path_type=Path),
              help="Directory that keeps the frozen primary's outputs per batch on disk, so that runs over the same "
                   "primary, data and batches compute them once (entries are keyed by a fingerprint of all three).")
@click.option("--save-every", default=200, show_default=True, help="Steps between resumable state saves.")
@click.option("--state-dir", type=click.Path(path_type=Path),
              help="Resumable training state [default: OUTPUT.train-state]; removed when the run completes.")
@click.option("--stop-after", type=int, help="End this run after N steps, keeping the state to resume from.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@json_option
def train(checkpoint, out, stage, model_name, objective, data, steps, batch, seq_len, lr, warmup, block_length,
          init_secondary_from_drafter, init_projections, primary_state_input, primary_state_logits,
          primary_state_layers, primary_state_feedback, router_hidden, draft_cost, seed, distinct_batches, tiled,
          primary_cache, save_every, state_dir, stop_after, force, as_json):
    """Train one stage of the recipe on CHECKPOINT and write the result to OUTPUT (resumable)."""
    import shutil

    from tandemc.checkpoint import load_checkpoint
    from tandemc.data import batch_at, load_corpus
    from tandemc.train import (TrainOptions, fit_projections, initialise_secondary_from_drafter, save_trained,
                               with_primary_state_input, with_router, with_router_threshold)
    from tandemc.train import train as run

    if out.exists() and not force:
        raise TandemcError(f"{out} already exists; pass --force to overwrite it")
    ckpt = load_checkpoint(checkpoint)
    if (primary_state_logits or primary_state_layers or primary_state_feedback) and not primary_state_input:
        raise TandemcError("--primary-state-logits, --primary-state-layers and --primary-state-feedback need "
                           "--primary-state-input N (the MLP they set up)")
    if primary_state_input:
        if stage != "tandem":
            raise TandemcError("--primary-state-input belongs to the tandem stage; add --stage tandem or drop it")
        ckpt = with_primary_state_input(ckpt, primary_state_input, seed, primary_state_logits,
                                        _layer_list(primary_state_layers, "--primary-state-layers"),
                                        primary_state_feedback)
    if (router_hidden or draft_cost) and stage != "router":
        raise TandemcError("--router-hidden and --draft-cost belong to the router stage; add --stage router or "
                           "drop them")
    if router_hidden:
        ckpt = with_router(ckpt, router_hidden, seed)
    if init_secondary_from_drafter:
        ckpt = initialise_secondary_from_drafter(ckpt)
    opts = TrainOptions(stage=stage, model=model_name, objective=objective, steps=steps, batch=batch,
                        seq_len=seq_len, lr=lr, warmup=warmup, block_length=block_length, seed=seed,
                        save_every=save_every, distinct_batches=distinct_batches, tiled=tiled).validate(ckpt)
    corpus = load_corpus(data, ckpt.tokenizer)
    if init_projections == "fit":
        ckpt = fit_projections(ckpt, batch_at(corpus.train, seed, 0, 64, seq_len)[:, :-1])
    state_dir = state_dir or out.with_name(out.name + ".train-state")
    if (state_dir / "state.json").is_file() and not as_json:
        click.echo(f"resuming from {state_dir}", err=True)
    result = run(ckpt, corpus.train, opts, state_dir, stop_after=stop_after, primary_cache=primary_cache)
    if result.step < opts.steps:
        _emit(as_json, {"output": None, "state_dir": str(state_dir), "steps": result.step},
              f"stopped at step {result.step}/{opts.steps}; rerun the same command to resume from {state_dir}")
        return
    extra = {}
    if stage == "router":
        ckpt, extra = with_router_threshold(ckpt, result.params, corpus, seq_len, draft_cost or 0.0)
    save_trained(out, ckpt, result, opts, force=force)
    shutil.rmtree(state_dir, ignore_errors=True)
    step, loss, accuracy = result.history[-1] if result.history else (result.step, float("nan"), float("nan"))
    run_steps = result.step - result.history[0][0] + 1 if result.history else 0
    tokens = run_steps * opts.batch * opts.seq_len
    trained = list(opts.trained(ckpt.params))
    data_out = {"output": str(out), "stage": stage, "trained": trained, "objective": objective,
                "steps": step, "loss": loss, "accuracy": accuracy, "seconds": round(result.seconds, 2),
                "tokens_per_second": round(tokens / max(result.seconds, 1e-9)), "train_files": corpus.n_files[0],
                "held_out_files": corpus.n_files[1], **extra}
    _emit(as_json, data_out, f"wrote {out}: {stage} {'/'.join(trained)} step {step} loss {loss:.4f} "
                             f"accuracy {accuracy:.3f} ({result.seconds:.0f}s)")


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", default="stdlib", show_default=True, help="Text file, directory, or 'stdlib' (its held-out files).")
@click.option("--windows", type=click.IntRange(min=1), default=64, show_default=True,
              help="Held-out windows for next-token metrics.")
@click.option("--seq-len", default=256, show_default=True)
@click.option("--block-length", "-g", default=0, help="Tandem block length for next-token metrics [default: gamma_train].")
@click.option("--gammas", default="1-8", show_default=True, help="Block lengths for the acceptance figures (e.g. 1-8 or 2,4).")
@click.option("--prompts", type=click.IntRange(min=1), default=64, show_default=True,
              help="Held-out prompts decoded per block length.")
@click.option("--new-tokens", default=64, show_default=True)
@json_option
def evaluate(checkpoint, data, windows, seq_len, block_length, gammas, prompts, new_tokens, as_json):
    """Held-out accuracy of the primary, tandem secondary and standalone drafter, and SPEED acceptance per γ."""
    import jax

    from tandemc.checkpoint import load_checkpoint
    from tandemc.data import evaluation_windows, load_corpus
    from tandemc.evaluate import acceptance_by_block_length, next_token_metrics

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    block = block_length or cfg.gamma_train
    gamma_list = _parse_range(gammas)
    corpus = load_corpus(data, ckpt.tokenizer)
    stream = corpus.held_out if len(corpus.held_out) > seq_len + 1 else corpus.train
    params = jax.tree.map(jax.numpy.asarray, ckpt.params)
    metrics = next_token_metrics(params, cfg, evaluation_windows(stream, seq_len, windows), block,
                                 other_blocks=gamma_list)
    prompt_windows = evaluation_windows(stream, 64, prompts)[:, :64]
    acceptance = acceptance_by_block_length(params, cfg, prompt_windows.tolist(), gamma_list, new_tokens)
    result = {**metrics, "block_length": block, "acceptance": acceptance,
              "held_out_files": corpus.n_files[1]}
    lines = [f"next-token accuracy (held-out, tandem blocks of {block}): primary {metrics['primary_accuracy']:.4f}  "
             f"tandem {metrics['tandem_accuracy']:.4f}" +
             (f"  standalone {metrics['standalone_accuracy']:.4f}" if "standalone_accuracy" in metrics else "")]
    agreement = {name: (metrics[f"{name}_agreement"],
                        " ".join(f"{a:.3f}" for a in metrics[f"{name}_agreement_by_position"]))
                 for name in ("tandem", "standalone") if f"{name}_agreement" in metrics}
    lines.append("agreement with the primary's argmax (by position in the block): " +
                 "  ".join(f"{name} {mean:.4f} ({by_position})" for name, (mean, by_position) in agreement.items()))
    if len(metrics.get("tandem_agreement_by_block_length", ())) > 1:
        lines.append("tandem agreement by block length: " + "  ".join(
            f"gamma {g} {a:.4f}" for g, a in metrics["tandem_agreement_by_block_length"].items()) +
            (f"  (standalone {metrics['standalone_agreement']:.4f} at any)" if "standalone_agreement" in metrics
             else ""))
    if "relative_tv" in metrics:
        lines.append(f"total-variation distance to the primary: tandem {metrics['tandem_tv']:.4f}  standalone "
                     f"{metrics['standalone_tv']:.4f}  (relative {metrics['relative_tv']:.3f})")
    lines.append("mean accepted tokens per greedy SPEED step:")
    for gamma, row in acceptance.items():
        lines.append(f"  gamma {gamma}: tandem {row['tandem']:.3f}" +
                     (f"  standalone {row['standalone']:.3f}" if "standalone" in row else "") +
                     (f"  adaptive {row['adaptive']:.3f} ({row['adaptive_drafted']:.2f} drafted)"
                      if "adaptive" in row else ""))
    _emit(as_json, result, "\n".join(lines))


@cli.command("generate-data")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Corpus directory.")
@click.option("--code", type=click.IntRange(min=0), default=512, show_default=True,
              help="Code samples: windows of --code-data's training split, continued by the primary.")
@click.option("--chat", type=click.IntRange(min=0), default=512, show_default=True,
              help="Chat samples: questions through the model's chat template, answered by the primary.")
@click.option("--code-data", default="stdlib", show_default=True,
              help="Text file, directory or 'stdlib': the code prompts, and the Python functions chat questions "
              "ask about.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=96, show_default=True,
              help="Tokens per code prompt.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens the primary adds to each prompt (fewer where it stops).")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Prompts per call.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@json_option
def generate_data(checkpoint, out, code, chat, code_data, prompt_tokens, new_tokens, batch, seed, force, as_json):
    """A training corpus of the primary's own greedy outputs, for drafters that predict what it will say.

    One text file per sample; train on it with `tandemc train --data OUTPUT` (docs/training.md).
    """
    from tandemc.checkpoint import load_checkpoint
    from tandemc.primary_corpus import generate_corpus

    summary = generate_corpus(load_checkpoint(checkpoint), out, code=code, chat=chat, code_data=code_data,
                              prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=batch, seed=seed,
                              force=force, progress=None if as_json else sys.stderr)
    _emit(as_json, {"path": str(out), **summary},
          f"wrote {out}: {code} code and {chat} chat samples, {summary['generated_tokens']} tokens of the primary's "
          f"({summary['seconds']:.0f}s)")


def _parse_range(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            values = list(range(lo, hi + 1))
        else:
            values = [int(x) for x in text.split(",")]
    except ValueError:
        raise TandemcError(f"cannot read block lengths {text!r}; write e.g. 1-8 or 2,4") from None
    if not values or min(values) < 1:
        raise TandemcError(f"block lengths must be >= 1, got {text!r}")
    return values


def assembly_options(seed_help: str):
    """The options every import that assembles a tandem shares (import-hf, import-gguf)."""
    def wrap(fn):
        for option in reversed([
            click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True),
            click.option("--layer-map", help="Comma-separated primary layer per secondary layer [default: evenly "
                         "spaced]."),
            click.option("--gamma-train", default=2, show_default=True),
            click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                         show_default=True),
            click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help=seed_help),
            click.option("--force", is_flag=True),
            json_option,
        ]):
            fn = option(fn)
        return fn
    return wrap


def _layer_list(text: str | None, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",")) if text else ()
    except ValueError:
        raise TandemcError(f"{option} must be comma-separated layer numbers, got {text!r}") from None


def _write_tandem(out: Path, cfg, params, tokenizer, force: bool, as_json: bool, extra: dict) -> None:
    """Save an assembled tandem and report it."""
    from tandemc.checkpoint import save_checkpoint

    save_checkpoint(out, cfg, params, tokenizer_file=tokenizer, force=force)
    counts = _parameter_counts(params)
    _emit(as_json, {"path": str(out), "parameters": counts, "layer_map": list(cfg.layer_map),
                    "tokenizer": cfg.tokenizer.type, **extra},
          f"wrote {out} ({', '.join(f'{k} {_human(v)}' for k, v in counts.items())} parameters; layer map "
          f"{list(cfg.layer_map)}; tokenizer {cfg.tokenizer.type}"
          + (f"; export passes {cfg.export_passes}" if cfg.export_passes else "") + ")")


@cli.command("import-hf")
@click.option("--primary", "primary_dir", type=click.Path(path_type=Path), required=True,
              help="Hugging Face Llama directory of the primary.")
@click.option("--secondary", "secondary_dir", type=click.Path(path_type=Path), required=True,
              help="Hugging Face Llama directory of the secondary (also the standalone drafter).")
@assembly_options("Seed for the fresh tandem projections.")
def import_hf(primary_dir, secondary_dir, out, layer_map, gamma_train, dtype, seed, force, as_json):
    """Build a tandem checkpoint from two Llama-family models that share a tokenizer."""
    from tandemc.hf import import_tandem

    cfg, params, tokenizer_file = import_tandem(primary_dir, secondary_dir,
                                                layer_map=_layer_list(layer_map, "--layer-map"),
                                                gamma_train=gamma_train, dtype=dtype, seed=seed)
    _write_tandem(out, cfg, params, tokenizer_file, force, as_json, {})


@cli.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--secondary-layers", default=2, show_default=True, help="Layers of the fresh tandem secondary.")
@click.option("--secondary-d-model", default=128, show_default=True, help="Width of the fresh tandem secondary.")
@click.option("--secondary-heads", default="2:1", show_default=True,
              help="Query:KV heads of the fresh secondary (head_dim 64, d_ff 3x its width).")
@click.option("--keep-quantized", is_flag=True,
              help="Export with the file's own integers and block scales (Q4_1, Q8_0): records the passes that "
              "reproduce them as the checkpoint's default export passes.")
@click.option("--draft-vocab", default=0, show_default=True, type=click.IntRange(min=0),
              help="Let the drafters propose only the N most frequent tokens of --draft-data (0: all tokens): "
              "their LM heads and embeddings shrink to N+1 rows; outputs stay exactly the primary's.")
@click.option("--draft-data", default="stdlib", show_default=True,
              help="Text file, directory or 'stdlib' whose training split's token counts choose the draft "
              "vocabulary.")
@click.option("--drafter", "with_drafter", is_flag=True,
              help="Add a standalone drafter shaped like the secondary (vanilla SPEED, the baseline).")
@click.option("--shared-embeddings", is_flag=True,
              help="The fresh drafters read and write tokens through the primary's token table and two "
              "projections of their own, instead of tables of their own.")
@click.option("--attach", "bundle", type=click.Path(path_type=Path, file_okay=False),
              help="A drafter bundle (`tandemc detach`) trained with this file's weights: its secondary, "
              "router, drafter and draft vocabulary instead of fresh ones (the sizing flags above are ignored).")
@assembly_options("Seed for the fresh secondary and tandem projections.")
def import_gguf(gguf_file, secondary_layers, secondary_d_model, secondary_heads, keep_quantized, draft_vocab,
                draft_data, with_drafter, shared_embeddings, bundle, out, layer_map, gamma_train, dtype, seed, force,
                as_json):
    """A Llama-architecture GGUF file (llama.cpp's format) as the primary of a tandem checkpoint.

    Weights are dequantized to DTYPE, the tokenizer becomes tokenizer.json and the chat template is kept. The
    tandem secondary starts random (train it with `tandemc train --stage tandem`); `--mode primary` generates and
    exports the imported model as it is.
    """
    import dataclasses

    from tandemc.gguf import import_gguf as read_gguf

    try:
        q_heads, kv_heads = (int(x) for x in secondary_heads.split(":"))
    except ValueError:
        raise TandemcError(f"--secondary-heads takes Q:KV head counts, got {secondary_heads!r}") from None
    secondary = {"n_layers": secondary_layers, "d_model": secondary_d_model, "n_heads": q_heads,
                 "n_kv_heads": kv_heads, "d_ff": 3 * secondary_d_model}
    cfg, params, tokenizer = read_gguf(gguf_file, secondary=secondary,
                                       layer_map=_layer_list(layer_map, "--layer-map"), gamma_train=gamma_train,
                                       dtype=dtype, seed=seed, keep_quantized=keep_quantized,
                                       draft_vocab=0 if bundle else draft_vocab, draft_data=draft_data,
                                       drafter=with_drafter and not bundle, shared_embeddings=shared_embeddings)
    if bundle:
        from tandemc.bundle import attach

        cfg, params = attach(cfg, params, bundle)
    _write_tandem(out, cfg, params, tokenizer, force, as_json, {"primary": dataclasses.asdict(cfg.primary),
                                                                 "export_passes": cfg.export_passes or "O1"})


@cli.command("detach")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="How the bundle stores floating-point tensors.")
@click.option("--force", is_flag=True)
@json_option
def detach(checkpoint, out, dtype, force, as_json):
    """Write a tandem checkpoint without its primary: a drafter bundle to ship beside a primary users get elsewhere.

    The bundle keeps the SHA-256 of every primary tensor; `tandemc import-gguf FILE --attach BUNDLE` puts it back
    together and refuses any other primary.
    """
    from tandemc.bundle import write_bundle
    from tandemc.checkpoint import load_checkpoint

    if out.resolve() == Path(checkpoint).resolve():
        raise TandemcError("the bundle would replace its checkpoint; choose another -o")
    write_bundle(load_checkpoint(checkpoint), out, dtype, force)
    size = sum(f.stat().st_size for f in out.iterdir())
    _emit(as_json, {"path": str(out), "bytes": size, "dtype": dtype},
          f"wrote {out} ({size / 1e6:.1f} MB, {dtype}): attach it with `tandemc import-gguf FILE --attach {out}`")


@cli.command("export-hf")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--model", "model_name", type=click.Choice(["primary", "drafter"]), default="primary",
              show_default=True, help="Which model of the tandem to write.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True)
@json_option
def export_hf(checkpoint, model_name, out, force, as_json):
    """Write one model as a Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json).

    The inverse of import-hf, for comparing with transformers or ONNX Runtime GenAI's model builder.
    """
    from tandemc.checkpoint import load_checkpoint
    from tandemc.hf import export_llama

    ckpt = load_checkpoint(checkpoint)
    export_llama(ckpt, model_name, out, force=force)
    cfg = getattr(ckpt.config, model_name)
    _emit(as_json, {"path": str(out), "model": model_name, "parameters": cfg.num_parameters()},
          f"wrote {out} ({model_name}, {_human(cfg.num_parameters())} parameters, LlamaForCausalLM)")


@cli.command("export-gguf")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--model", "model_name", type=click.Choice(["primary", "drafter"]), default="drafter",
              show_default=True, help="Which model of the tandem to write.")
@click.option("--tokenizer-from", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The GGUF file the checkpoint's primary came from: its tokenizer metadata is copied.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@json_option
def export_gguf(checkpoint, model_name, tokenizer_from, out, force, as_json):
    """Write one model as a float32 Llama GGUF file, e.g. the drafter for llama.cpp's speculative decoding.

    A drafter over a draft vocabulary or the primary's table becomes a plain Llama over the whole vocabulary, as
    for export-hf.
    """
    from tandemc.checkpoint import load_checkpoint
    from tandemc.gguf import write_gguf

    if out.exists() and not force:
        raise TandemcError(f"{out} already exists; pass --force to overwrite it")
    if out.resolve() == tokenizer_from.resolve():
        raise TandemcError("the output would replace the --tokenizer-from file; choose another -o")
    ckpt = load_checkpoint(checkpoint)
    write_gguf(ckpt, model_name, out, tokenizer_from)
    _emit(as_json, {"path": str(out), "model": model_name, "bytes": out.stat().st_size},
          f"wrote {out} ({model_name}, {out.stat().st_size / 1e6:.1f} MB, float32 Llama GGUF)")


def _prompt_ids(text: str, chat: bool, cfg, tokenizer) -> list[int]:
    """The prompt's token ids; with `chat`, as one user turn through the model's chat template (the template adds
    any BOS it wants, so none is prepended)."""
    if not chat:
        return tokenizer.encode(text)
    from tandemc.tokenizer import render_chat

    return tokenizer.encode(render_chat(cfg.tokenizer.chat_template, text, tokenizer), add_bos=False)


def _format_stats(s: dict, compiled: bool = True) -> str:
    return (f"steps {s['steps']}  new tokens {s['new_tokens']}  drafted {s['drafted']}  accepted {s['accepted']}  "
            f"mean accepted/step {s['mean_accepted_per_step']:.2f}  acceptance {s['acceptance_rate']:.1%}  "
            f"{s['seconds']:.2f}s" + (" (includes compilation)" if compiled else "")
            + (f"  {s['tokens_per_second']:.1f} tokens/s" if "tokens_per_second" in s else "")
            + ("  steps by block length " + " ".join(f"{g}:{n}" for g, n in s["steps_by_block_length"].items())
               if "steps_by_block_length" in s else ""))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["tpu", "cpu", "gpu"]), required=True,
              help="tpu: StableHLO (jax.export); cpu: ONNX for ONNX Runtime; gpu: TensorRT-profile ONNX, its build "
              "spec and (with TensorRT and a GPU) engines.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Artifact directory.")
@click.option("--mode", type=click.Choice(["speed", "tandem", "adaptive", "primary", "vanilla"]), default="speed",
              show_default=True, help="Decoding the graphs implement (primary and vanilla are the baselines).")
@click.option("--block-length", "-g", default=0, help="Draft block length γ [default: the checkpoint's gamma_train].")
@click.option("--block-lengths", default="",
              help="Step graphs at these block lengths too (e.g. 0,1,2; 0: a primary step that keeps the drafter's "
              "cache current); `tandemc run` then picks one per step from the acceptance and step times it measures "
              "(docs/artifact.md, \"Block-length schedules\").")
@click.option("--router-threshold", type=click.FloatRange(0.0, 1.0),
              help="adaptive: stop drafting where the router's predicted rejection exceeds this [default: the "
              "checkpoint's router.threshold, chosen by the router stage].")
@click.option("--max-seq-len", default="256", show_default=True,
              help="Cache length, or increasing buckets (e.g. 128,512): the runtime picks the smallest that fits.")
@click.option("--batch", default=1, show_default=True, help="Rows per call.")
@click.option("--prefill-chunk", default=64, show_default=True, help="Prompt tokens per prefill call.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Length of the in-graph generate loop.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--platforms", default="", help="tpu target: comma-separated platforms [default: tpu,cpu].")
@click.option("--mesh", default="", help="tpu target: DATAxMODEL device mesh, e.g. 2x4 (batch over DATA, heads and "
              "MLP width over MODEL).")
@click.option("--savedmodel", is_flag=True, help="tpu target: also write a TensorFlow SavedModel wrapping the same "
              "StableHLO, for TF Serving (needs tandemc[tf]).")
@click.option("-O", "opt_level", type=click.Choice(["0", "1", "2", "3"]), default=None,
              help="Pass preset: 0 none, 1 exact fusions, 2 fusions + int8 weights, 3 fusions + int8 weights and "
              "activations (cpu, tpu) (`tandemc passes`) [default: the checkpoint's export_passes, else 1].")
@click.option("--passes", "pass_list", default=None,
              help="Comma-separated passes instead of -O, e.g. fuse_qkv,quantize_int4:block=64:models=primary.")
@click.option("--no-verify", is_flag=True, help="Skip the check against the reference before writing.")
@click.option("--verify-prompts", type=click.IntRange(min=1), default=4, show_default=True,
              help="Prompts decoded by the artifact and the reference (--no-verify skips verification).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@json_option
def export(checkpoint, target, out, mode, block_length, block_lengths, router_threshold, max_seq_len, batch, prefill_chunk,
           max_new_tokens, dtype, platforms, mesh, savedmodel, opt_level, pass_list, no_verify, verify_prompts, force,
           as_json):
    """Compile CHECKPOINT into a verified artifact directory for a target."""
    import dataclasses

    from tandemc.checkpoint import load_checkpoint
    from tandemc.export import export as run
    from tandemc.program import ExportOptions

    options = ExportOptions(mode=mode, block_length=block_length,
                            block_lengths=_parse_ints(block_lengths, "--block-lengths") if block_lengths else (),
                            max_seq_len=_parse_ints(max_seq_len, "--max-seq-len"),
                            batch=batch, prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, dtype=dtype,
                            mesh=_parse_mesh(mesh) if mesh else None)
    start = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    if router_threshold is not None:
        if mode != "adaptive" or ckpt.config.router is None:
            raise TandemcError("--router-threshold applies to --mode adaptive with a checkpoint that has a router; "
                               "drop it or add --mode adaptive")
        ckpt = dataclasses.replace(ckpt, config=ckpt.config.with_router_threshold(router_threshold))
    manifest = run(ckpt, target, out, options, platforms=[p for p in platforms.split(",") if p] or None,
                   force=force, verify=not no_verify, verify_prompts=verify_prompts, savedmodel=savedmodel,
                   passes=pass_list if pass_list is not None else f"O{opt_level}" if opt_level is not None else
                   ckpt.config.export_passes or "O1")
    seconds = time.perf_counter() - start
    check = manifest.get("verification")
    if target == "gpu" and not manifest["tensorrt"]["engines"]:
        from tandemc.targets.tensorrt import missing_reason

        click.echo(f"TensorRT engines will be built on the GPU host: tandemc build-engine {out} "
                   f"({missing_reason()})", err=True)
    _emit(as_json, {"output": str(out), "target": target, "graphs": sorted(manifest["graphs"]),
                    "passes": manifest["passes"], "verification": check, "seconds": round(seconds, 2)},
          f"wrote {out}: {target}, {len(manifest['graphs'])} graphs, passes "
          f"{','.join(p['name'] for p in manifest['passes']) or 'none'}, "
          + (f"verified ({_verify_summary(check)})" if check else "not verified") + f" ({seconds:.0f}s)")


@cli.command("passes")
@json_option
def list_passes(as_json):
    """List the passes export can apply, in their documented order, and the -O presets."""
    from tandemc.passes import PRESETS, REGISTRY

    _emit(as_json, {"passes": [{"name": p.name, "exact": p.exact, "summary": p.summary, "options": p.options}
                               for p in REGISTRY.values()], "presets": PRESETS},
          "\n".join([f"{p.name:16s} {'exact' if p.exact else 'lossy'}  {p.summary}" for p in REGISTRY.values()]
                    + [f"-{name}: {', '.join(names) or 'no passes'}" for name, names in PRESETS.items()]))


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeat for a batch).")
@click.option("--max-new-tokens", "-n", default=64, show_default=True)
@sampling_options
@click.option("--generate-graph", is_flag=True, help="One call of the in-graph generate loop instead of steps.")
@click.option("--block-length", "-g", default=None,
              help="'auto' or one of the artifact's block lengths (`export --block-lengths`) [default: auto where it "
              "has several, else its one].")
@click.option("--backend", type=click.Choice(["savedmodel", "iree", "onnxruntime"]),
              help="savedmodel: a tpu artifact's TensorFlow SavedModel; iree: its StableHLO compiled by IREE for "
              "this CPU; onnxruntime: a gpu artifact's ONNX graphs in ONNX Runtime (no TensorRT needed) [default: "
              "the target's own runtime].")
@click.option("--stats", is_flag=True, help="Print decoding statistics to stderr.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads (cpu artifacts; 0: one per core).")
@click.option("--profile", type=click.Path(file_okay=False, path_type=Path),
              help="Write ONNX Runtime's profiler trace of each graph to this folder and print where the time went "
              "(by scope: draft0.., verify, tandem_kv; and by operator) to stderr.")
@click.option("--chat", is_flag=True, help="Send the prompt as a user turn through the model's chat template.")
@json_option
def run(artifact, prompts, max_new_tokens, temperature, top_k, top_p, seed, generate_graph, block_length, backend,
        stats, threads, profile, chat, as_json):
    """Generate text with a compiled artifact."""
    from tandemc.runtime import load

    loaded = load(artifact, backend, threads=threads, profile=profile)
    if chat:
        prompts = [_prompt_ids(p, True, loaded.config, loaded.tokenizer) for p in prompts]
    result = loaded.generate(list(prompts), max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, use_generate_graph=generate_graph, block_length=block_length)
    if profile is not None:
        from tandemc.profiling import format_summary, summarize

        for graph, trace in loaded.backend.end_profiling().items():
            summary = summarize(trace)
            if summary is not None:
                click.echo(f"{format_summary(graph, summary)}\n  trace: {trace}", err=True)
    if as_json:
        rows = [{"tokens": t, "text": x} for t, x in zip(result.tokens, result.text)]
        data = {**rows[0], "stats": result.stats, "mode": loaded.decode["mode"]} if len(rows) == 1 else \
            {"results": rows, "stats": result.stats, "mode": loaded.decode["mode"]}
        _emit(True, data, "")
        return
    click.echo("\n".join(result.text))
    if stats:
        click.echo(_format_stats(result.stats, compiled=False), err=True)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="The checkpoint it came from.")
@click.option("--prompts", type=click.IntRange(min=1), default=8, show_default=True,
              help="Random-token prompts to compare on.")
@click.option("--backend", type=click.Choice(["savedmodel", "iree", "onnxruntime"]),
              help="Verify a tpu artifact's SavedModel or its StableHLO under IREE, or a gpu artifact's ONNX graphs in "
              "ONNX Runtime.")
@json_option
def verify(artifact, checkpoint, prompts, backend, as_json):
    """Compare an artifact with the JAX reference: token identity (greedy, sampled) and max |Δlogits|."""
    from tandemc.checkpoint import load_checkpoint
    from tandemc.program import program_for_artifact
    from tandemc.runtime import load
    from tandemc.verify import verify as run

    loaded = load(artifact, backend)
    report = run(loaded, program_for_artifact(load_checkpoint(checkpoint), loaded.manifest), prompts=prompts)
    _emit(as_json, report, ("OK: " if report["ok"] else "MISMATCH: ") + _verify_summary(report))
    if not report["ok"]:
        sys.exit(1)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["gpu"]), required=True, help="The profile to check against.")
@json_option
def check(artifact, target, as_json):
    """Check an artifact's ONNX graphs against TensorRT's profile; names each offending node, exit 1 if any."""
    from tandemc.targets.tensorrt import check_artifact

    report = check_artifact(artifact)
    problems = [p for ps in report.values() for p in ps]
    _emit(as_json, {"ok": not problems, "graphs": report},
          "\n".join(problems) if problems else f"OK: {len(report)} graphs satisfy the TensorRT profile")
    if problems:
        sys.exit(1)


@cli.command("build-engine")
@click.argument("artifact", type=click.Path(path_type=Path))
@json_option
def build_engine(artifact, as_json):
    """Build a gpu artifact's TensorRT engines on this (GPU) host and record them in its manifest."""
    from tandemc.targets.tensorrt import build_engines

    manifest = build_engines(artifact, log=lambda line: click.echo(line, err=True))
    info = manifest["tensorrt"]
    _emit(as_json, info, f"built {len(info['engines'])} engines with TensorRT {info['version']} for {info['gpu']}")


def _verify_summary(report: dict) -> str:
    from tandemc.verify import summary

    return summary(report)


def _inspect_artifact(path: Path, as_json: bool) -> None:
    from tandemc.artifact import block_lengths, read_manifest

    m = read_manifest(path)
    sizes = {name: (path / name).stat().st_size for name in m["files"]}
    graphs = {key: {"inputs": len(g["inputs"]), "outputs": len(g["outputs"]), "weights": len(g["weights"]),
                    "seq_len": g["seq_len"]} for key, g in m["graphs"].items()}
    data = {"path": str(path), "target": m["target"], "tandemc_version": m["tandemc_version"], "decode": m["decode"],
            "graphs": graphs, "passes": m["passes"], "verification": m.get("verification"),
            "bytes": sum(sizes.values()), "files": sizes, **({"platforms": m["platforms"]} if "platforms" in m else {}),
            **({"tensorrt": m["tensorrt"]} if "tensorrt" in m else {})}
    d = m["decode"]
    lines = [f"{path}: tandemc artifact for {m['target']} (schema {m['schema_version']}, tandemc "
             f"{m['tandemc_version']}){'  platforms ' + ','.join(m['platforms']) if 'platforms' in m else ''}",
             f"  decode: mode {d['mode']}  block length {d['block_length']}"
             + (f" (step graphs at {','.join(map(str, block_lengths(d)))})" if len(block_lengths(d)) > 1 else "")
             + f"  batch {d['batch']}  prefill chunk "
             f"{d['prefill_chunk']}  cache buckets {d['cache_buckets']}  generate {d['max_new_tokens']} tokens  "
             f"{d['dtype']}",
             f"  passes: {', '.join(p['name'] for p in m['passes']) or 'none'}"]
    for key, g in sorted(m["graphs"].items()):
        lines.append(f"  graph {key:16s} {len(g['weights'])} weights + {len(g['inputs'])} inputs -> "
                     f"{len(g['outputs'])} outputs ({len(g['state'])} state)")
    lines.append(f"  files: {len(sizes)}, {_bytes(sum(sizes.values()))}")
    if "tensorrt" in m:
        trt = m["tensorrt"]
        lines.append(f"  tensorrt: {len(trt['engines'])} engines built with TensorRT {trt['version']} for {trt['gpu']}"
                     if trt["engines"] else "  tensorrt: no engines yet (tandemc build-engine on the GPU host)")
    check = m.get("verification")
    lines.append("  verification: " + (_verify_summary(check) if check else "not run"))
    _emit(as_json, data, "\n".join(lines))


def _parse_mesh(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise TandemcError(f"--mesh takes DATAxMODEL, e.g. 2x4, got {text!r}")
    return int(parts[0]), int(parts[1])


def _parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise TandemcError(f"{flag} takes integers separated by commas, got {text!r}") from None


def _parameter_counts(params) -> dict:
    from tandemc.params import count

    return {name: count(tree) for name, tree in params.items()}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def main():
    cli(prog_name="tandemc")


if __name__ == "__main__":
    sys.exit(main())
