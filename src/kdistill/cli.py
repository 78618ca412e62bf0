"""The ``kdistill`` command line. Each subcommand calls exactly one public API function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import api
from .errors import KDistillError

# rich_markup_mode=None: plain help text. typer's rich help prints a type such as `<bool>` after every flag,
# --help included, as though the flag took a value; the plain formatter shows flags bare.
app = typer.Typer(add_completion=False, no_args_is_help=False, rich_markup_mode=None,
                  help="kdistill: knowledge distillation toolkit.")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("run")
def run_cmd(
    config: Annotated[Optional[str],
                      typer.Argument(help="Recipe file or built-in name (default: classic/mnist1d).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. train.epochs=5")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder (default runs/<name>).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (overrides the recipe's).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --output.")] = False,
    nproc: Annotated[int, typer.Option(help="Processes to launch with torchrun (DDP).")] = 1,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Run a recipe: train/reuse the teacher, distil the student(s), evaluate, write the report."""
    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `kdistill run train.epochs=3` -> default recipe + override
        config = None
    from .train.loop import end_distributed  # imports torch: not at CLI start-up

    try:
        api.run(config, output=output, seed=seed, resume=resume, overrides=overrides, nproc=nproc,
                progress=not no_progress)
        end_distributed(exit_code=0)  # a torchrun rank whose work is done and written leaves here
    except KDistillError as e:
        if api.hand_error_to_launcher(e):  # a rank of `--nproc N`: the launcher prints it once
            end_distributed(exit_code=0)
            raise typer.Exit(0) from None
        _fail(e)
    finally:
        end_distributed()


_ABBREVIATIONS = ("e.g", "i.e", "al", "vs", "cf", "etc", "approx")


def _first_sentence(text: str) -> str:
    """``text`` up to the end of its first sentence: the first ``.``, ``!`` or ``?`` followed by a space (or the
    end) that is outside backticks and brackets and does not close an abbreviation such as ``e.g.``."""
    depth, in_code = 0, False
    for i, ch in enumerate(text):
        if ch == "`":
            in_code = not in_code
        elif in_code:
            continue
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch in ".!?" and depth == 0 and (i + 1 == len(text) or text[i + 1].isspace()):
            word = text[:i].rsplit(None, 1)[-1].lower() if text[:i].strip() else ""
            if word.lstrip("(\"'") not in _ABBREVIATIONS:
                return text[: i + 1]
    return text


@app.command("list")
def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print JSON (full descriptions).")] = False) -> None:
    """List methods, augmentations, models, datasets, tasks and built-in recipes."""
    everything = api.list_all()
    if as_json:
        typer.echo(json.dumps(everything, indent=2))
        return
    # Plain lines, one entry each, never wrapped, so the listing reads the same in a terminal, a pipe or grep.
    width = max((len(name) for items in everything.values() for name in items), default=0) + 2
    for section, items in everything.items():
        typer.echo(f"{section} ({len(items)})")
        for name, doc in items.items():
            typer.echo(f"  {name:<{width}}{_first_sentence(doc)}".rstrip())


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A model folder (e.g. runs/x/student) or a run folder.")],
) -> None:
    """Evaluate a saved student on its dataset's test split."""
    try:
        typer.echo(json.dumps(api.evaluate(checkpoint), indent=2))
    except KDistillError as e:
        _fail(e)


@app.command("audit")
def audit_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (e.g. runs/smollm2_kjv).")],
    samples: Annotated[int, typer.Option(help="Training sequences sampled for the memorisation audit.")] = 64,
) -> None:
    """Audit a run (teacher hacking, memorisation, interpolation vs extrapolation); writes audit.json/.md."""
    try:
        typer.echo(json.dumps(api.audit(run_dir, samples=samples), indent=2))
    except KDistillError as e:
        _fail(e)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A model folder or a run folder.")],
    out: Annotated[Path, typer.Option("--out", help="Destination folder.")],
) -> None:
    """Export the student only (safetensors + config) and check that it reloads with identical outputs."""
    try:
        typer.echo(json.dumps(api.export(checkpoint, out), indent=2))
    except KDistillError as e:
        _fail(e)


@app.command("sample")
def sample_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A diffusion run folder (e.g. runs/diffusion_fashion).")],
    n: Annotated[int, typer.Option("--n", help="How many samples.")] = 64,
    steps: Annotated[int, typer.Option("--steps", help="Network evaluations per sample.")] = 1,
    model: Annotated[str, typer.Option("--model", help="student, teacher, or a variant's name.")] = "student",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the noise.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="PNG path (default: <run>/samples/...).")] = None,
) -> None:
    """Draw samples from a diffusion run's student (or teacher) and write them as a grid PNG."""
    try:
        typer.echo(json.dumps(api.sample(run_dir, n=n, steps=steps, model=model, seed=seed, out=out), indent=2))
    except KDistillError as e:
        _fail(e)


@app.command("cache")
def cache_cmd(
    config: Annotated[str, typer.Argument(help="An llm recipe file or built-in name (e.g. llm/smollm2_kjv).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides")] = None,
    output: Annotated[Optional[Path],
                      typer.Option("--output", "-o", help="Cache folder (default: the recipe's cache.dir).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress.")] = False,
    nproc: Annotated[int, typer.Option(help="Processes to run the teacher in (torchrun; one GPU each).")] = 1,
) -> None:
    """Run the teacher once and store its top-k log-probs (resumable, verified) for training without it."""
    import os

    from .train.loop import end_distributed  # imports torch: not at CLI start-up

    try:
        info = api.cache(config, output=output, overrides=list(overrides or []), progress=not no_progress,
                         nproc=nproc)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(json.dumps(info, indent=2))
        end_distributed(exit_code=0)  # a torchrun rank whose shards are written and merged leaves here
    except KDistillError as e:
        if api.hand_error_to_launcher(e):
            end_distributed(exit_code=0)
            raise typer.Exit(0) from None
        _fail(e)
    finally:
        end_distributed()


@app.command("select")
def select_cmd(
    config: Annotated[str, typer.Argument(help="A recipe file or built-in name (classification, llm or blackbox).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for subset.jsonl and selection.json.")] = ...,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress.")] = False,
) -> None:
    """Choose the training subset to distil on (data.selection, or the task's default at 50%) and write it."""
    try:
        typer.echo(json.dumps(api.select(config, output=output, overrides=list(overrides or []),
                                         progress=not no_progress), indent=2))
    except KDistillError as e:
        _fail(e)


@app.command("design")
def design_cmd(
    config: Annotated[str, typer.Argument(help="A classification or llm recipe file or built-in name.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for design.json, pareto.png and "
                                                                "recipe.yaml.")] = ...,
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="params=N, latency_ms=X (per batch, "
                                                                         "measured here), or both: "
                                                                         "params=N,latency_ms=X.")] = None,
    capacity_gap: Annotated[bool, typer.Option("--capacity-gap", help="Distil and train alone every candidate: "
                                                                      "where does distillation help most?")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress.")] = False,
) -> None:
    """Choose the student: candidates within a budget, ranked without training (DisWOT), the best distilled briefly."""
    try:
        typer.echo(json.dumps(api.design(config, output=output, budget=budget, capacity_gap=capacity_gap,
                                         overrides=list(overrides or []), progress=not no_progress), indent=2))
    except KDistillError as e:
        _fail(e)


@app.command("serve")
def serve_cmd(
    model: Annotated[str, typer.Argument(help="Zoo name (smollm2-135m), a saved Hugging Face causal LM folder, "
                                              "or (online) a hub id.")],
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).")] = 8000,
    api_key_env: Annotated[Optional[str], typer.Option(help="NAME of the env var holding a bearer token clients "
                                                            "must send (not the token).")] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for (>= 1).")] = 512,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted (tokens, >= 1).")] = 2048,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted (bytes, >= 1).")] = 1_000_000,
    max_batch_size: Annotated[int, typer.Option(help="Sequences decoded together in one batch (>= 1).")] = 8,
    threads: Annotated[Optional[int],
                       typer.Option(help="torch CPU threads (>= 1; 1 helps on a busy, shared CPU).")] = None,
) -> None:
    """Serve a local causal LM over an OpenAI-compatible HTTP API (for black-box distillation).
    Options are checked before the model loads; a bad one exits with code 2 and one line."""
    try:
        api.serve(model, host=host, port=port, api_key_env=api_key_env, max_tokens_limit=max_tokens_limit,
                  max_prompt_tokens=max_prompt_tokens, max_request_bytes=max_request_bytes,
                  max_batch_size=max_batch_size, threads=threads)
    except KDistillError as e:
        _fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
