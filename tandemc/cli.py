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
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TandemcError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


def _emit(as_json: bool, data: dict, human: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else human)


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tandemc")
def cli():
    """tandemc: compile Tandem Transformer checkpoints (primary + tandem secondary) for deployment."""


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", help="Named configuration (tiny, small, 100m, 1b).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="A config.json to initialise from instead of a preset.")
@click.option("--seed", default=0, show_default=True, help="Random seed for the weights.")
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
    """Describe a checkpoint: parameters per model, shapes, layer map, bytes by dtype."""
    from tandemc.checkpoint import inspect_checkpoint

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
            "layer_map": list(cfg.layer_map), "gamma_train": cfg.gamma_train, "tokenizer": cfg.tokenizer.type,
            "bytes_by_dtype": dict(by_dtype), "total_parameters": sum(by_model.values())}
    lines = [f"{path}: tandem checkpoint (schema {cfg.schema_version}, {cfg.dtype}, tokenizer {cfg.tokenizer.type})"]
    for name, m in models.items():
        lines.append(f"  {name:9s} {_human(m['parameters']):>7s} params  {m['layers']} layers  d={m['d_model']}  "
                     f"heads {m['heads']}/{m['kv_heads']} kv x {m['head_dim']}  ff={m['d_ff']}  vocab {m['vocab_size']}"
                     f"{'  tied' if m['tied_embeddings'] else ''}")
    lines.append(f"  tandem    {_human(by_model['tandem']):>7s} params  layer map (secondary j <- primary l(j)): "
                 f"{list(cfg.layer_map)}  gamma_train {cfg.gamma_train}")
    if cfg.router:
        lines.append(f"  router    {_human(by_model['router']):>7s} params  top_k {cfg.router.top_k}  "
                     f"hidden {cfg.router.hidden}  threshold {cfg.router.threshold}")
    lines.append("  bytes:    " + ", ".join(f"{k} {_bytes(v)}" for k, v in sorted(by_dtype.items())))
    _emit(as_json, data, "\n".join(lines))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--mode", type=click.Choice(["speed", "tandem", "primary", "vanilla"]), default="speed",
              show_default=True, help="speed: exact draft-verify; tandem: standalone Tandem; primary: primary "
              "only; vanilla: SPEED with the standalone drafter.")
@click.option("--block-length", "-g", type=int, help="Draft block length γ [default: the checkpoint's gamma_train].")
@click.option("--max-new-tokens", "-n", default=64, show_default=True)
@click.option("--temperature", "-t", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens (0: off).")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (1: off).")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-seq-len", type=int, help="Cache length [default: the models' max_seq_len].")
@click.option("--stats", is_flag=True, help="Print decoding statistics to stderr.")
@json_option
def generate(checkpoint, prompt, mode, block_length, max_new_tokens, temperature, top_k, top_p, seed, max_seq_len,
             stats, as_json):
    """Generate text with the JAX reference decoder."""
    import jax

    from tandemc.checkpoint import load_checkpoint
    from tandemc.decoding import generate as run

    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise TandemcError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    ckpt = load_checkpoint(checkpoint)
    params = jax.tree.map(jax.numpy.asarray, ckpt.params)
    tok = ckpt.tokenizer
    start = time.perf_counter()
    result = run(params, ckpt.config, [tok.encode(prompt)], mode=mode, block_length=block_length,
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


def _format_stats(s: dict) -> str:
    return (f"steps {s['steps']}  new tokens {s['new_tokens']}  drafted {s['drafted']}  accepted {s['accepted']}  "
            f"mean accepted/step {s['mean_accepted_per_step']:.2f}  acceptance {s['acceptance_rate']:.1%}  "
            f"{s['seconds']:.2f}s (includes compilation)")


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
