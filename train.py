"""Train or fine-tune GPT-2: flags in, checkpoints, metrics, a loss curve and a few samples out.

    python train.py                                   fine-tune gpt2 on the bundled Python-docs corpus (minutes)
    python train.py --init scratch                    train a tiny GPT-2 from random weights; works offline
    python train.py --init out/pydocs-gpt2 --data notes.txt --out out/notes
    python train.py --config run.toml --max_steps 500 --dtype bf16
    python train.py --out out/pydocs-gpt2 --resume auto           continue an interrupted run
    torchrun --nproc_per_node 4 train.py --init gpt2-medium ...   data-parallel on 4 GPUs (or CPU processes)

Every setting is a field of `minigpt2.train_config.TrainConfig` and a flag of the same name (`--max_steps` or
`--max-steps`); `--config FILE.toml` sets fields from a file and flags win over it. On --resume, the settings saved
with the checkpoint are the defaults, so `--resume auto` alone continues the run as it was, and --out defaults to the
folder that holds the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from minigpt2.cli import add_dataclass_flags, add_flag, dataclass_from_flags, make_parser, parse_path, run_main
from minigpt2.train_config import TrainConfig, load_toml

PROMPTS = ("def read_lines(path):", '"""Return the number of', "class Stack:")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def parse_config(argv: Sequence[str] | None) -> TrainConfig:
    """The resolved TrainConfig: defaults < saved settings of the run resumed < --config file < flags."""
    from minigpt2.checkpoint import PREFIX, STATE_JSON, read_saved_config
    from minigpt2.errors import CheckpointError, MiniGPT2Error
    from minigpt2.trainer import find_resume_checkpoint

    parser = make_parser("train.py", description="Train or fine-tune GPT-2 (see the module docstring).")
    add_flag(parser, "config", metavar="FILE.toml", type=parse_path, action="append",
             help="read settings from a TOML file; flags win over it")
    add_dataclass_flags(parser, TrainConfig)
    args = parser.parse_args(argv)
    if args.config and len(args.config) > 1:  # silently keeping the last one would drop the others' settings
        parser.error("--config is given more than once; give one file (flags can override its settings)")
    from_file = load_toml(args.config[0]) if args.config else {}
    config = dataclass_from_flags(TrainConfig, args, from_file)
    resumed = find_resume_checkpoint(config.resume, Path(config.out))
    if resumed is not None:
        saved = {k: v for k, v in read_saved_config(resumed).items() if k not in ("resume", "overwrite")}
        if resumed.name.startswith(PREFIX):
            # A run goes on in the folder that holds its checkpoint: the saved --out may be relative to another
            # working directory, or name where the folder was before it was moved.
            saved["out"] = str(resumed.parent)
        try:
            run = dataclass_from_flags(TrainConfig, argparse.Namespace(), saved)  # the checkpoint's settings alone
        except MiniGPT2Error as exc:
            raise CheckpointError(f"{resumed / STATE_JSON}: damaged settings ({exc}); resume from another "
                                  "checkpoint") from None
        config = dataclass_from_flags(TrainConfig, args, {**saved, **from_file})
    # Settings that a resumed run takes from its checkpoint, whatever is asked: asked otherwise, they would be
    # ignored without a word (and recorded as if they had applied).
    given: dict[str, tuple[object, str, str]] = {}  # name: (value, where it was asked, how to take it back)
    for name in ("model_preset", "init", "seed"):
        if getattr(args, name) is not None:
            given[name] = (getattr(args, name), f"--{name} {getattr(args, name)}", f"drop --{name}")
        elif name in from_file:
            given[name] = (from_file[name], f"--config {args.config[0]}: {name} = {from_file[name]!r}",
                           f"remove {name} from {args.config[0]}")
    if resumed is not None:
        _check_kept_on_resume(given, run, resumed, parser)
    elif args.model_preset is not None and config.init != "scratch":  # a preset only shapes a new random model
        parser.error(f"--model_preset shapes a new model (--init scratch); --init {config.init} loads a model that "
                     "has its own shape: drop --model_preset, or use --init scratch")
    return config


def _check_kept_on_resume(given: dict[str, tuple[object, str, str]], run: TrainConfig, resumed: Path,
                          parser: argparse.ArgumentParser) -> None:
    """A usage error if a setting that the resumed run keeps from its checkpoint was asked to be something else."""
    from minigpt2.config import preset_key

    if "model_preset" in given:
        shape = run.model_preset if run.init == "scratch" else f"the model it started from ({run.init})"
        value, where, drop = given["model_preset"]
        if preset_key(str(value)) != preset_key(shape):  # the resume hint repeats the run's own preset
            parser.error(f"{where}: the run resumed from {resumed} has the shape of {shape}, which its checkpoint "
                         f"keeps; {drop}")
    if "init" in given and not _same_source(str(given["init"][0]), run.init):
        _, where, drop = given["init"]
        parser.error(f"{where}: the run resumed from {resumed} started from {run.init} and goes on from its "
                     f"checkpoint; {drop} (or use --init alone, without --resume, to start a new run from that "
                     "model)")
    if "seed" in given and given["seed"][0] != run.seed:
        _, where, drop = given["seed"]
        parser.error(f"{where}: the run resumed from {resumed} was seeded with {run.seed}, and its random state goes "
                     f"on from its checkpoint; {drop} (or start a new run from its weights with --init {resumed} "
                     "and another seed)")


def _same_source(given: str, saved: str) -> bool:
    """Whether two --init values name the same model (the same Hub id, or paths to the same directory)."""
    return given == saved or (Path(given).exists() and Path(given).resolve() == Path(saved).resolve())


def print_samples(model, config: TrainConfig) -> None:
    """A few sampled continuations of PROMPTS from the trained model."""
    import torch

    from minigpt2 import Tokenizer

    tokenizer = Tokenizer()
    torch.manual_seed(config.seed)
    model.eval()
    device = next(model.parameters()).device
    for prompt in PROMPTS[:config.samples]:
        input_ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        room = model.config.n_positions - input_ids.shape[1]
        # Every token of a prompt is text, even one equal to the model's pad_token_id.
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=min(config.sample_tokens, room), do_sample=True, top_k=50,
                                temperature=0.8)
        print(f"--- sample: {prompt!r}\n{tokenizer.decode(output[0].tolist())}\n")


def write_before_after_report(config: TrainConfig, trainer, result) -> None:
    """report.html/.md in the output directory: the starting model vs the trained one on the validation split."""
    import torch

    from minigpt2 import GPT, GPTConfig, Tokenizer
    from minigpt2.evaluate import text_bytes
    from minigpt2.report import write_report

    if config.init == "scratch":
        torch.manual_seed(config.seed)  # the very weights the run started from, as the trainer seeds them
        base = GPT(GPTConfig.from_preset(config.model_preset))
        base_name = f"untrained {config.model_preset}"
    else:
        base, base_name = GPT.from_pretrained(config.init), config.init
    val = trainer.data.tokens("val")
    if config.report_tokens:
        val = val[:config.report_tokens]
    # Prompt and continuation must fit the context together, also for the small models of quick runs.
    context = base.config.n_positions
    prompt_tokens = min(24, context // 4)
    print("writing the before/after report (perplexity and samples of both models)...", flush=True)
    html, md = write_report(base.to(trainer.device), GPT.from_pretrained(result.model_dir).to(trainer.device), val,
                            result.out_dir, base_name=base_name, finetuned_name=str(result.model_dir),
                            num_prompts=3, prompt_tokens=prompt_tokens, n_bytes=text_bytes(val, Tokenizer()),
                            max_new_tokens=min(config.sample_tokens, context - prompt_tokens), seed=config.seed,
                            progress=config.progress)
    print(f"report: {html} (and {md.name})")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0

    from minigpt2.trainer import Trainer

    trainer = Trainer(config)  # loads the model and data: bad input is refused here, before any settings are shown
    if main_process:
        where = Path(config.out) / "train_config.json"
        print(f"settings (written to {where} when training starts):\n{config.describe()}", flush=True)
    try:
        with trainer.out_locked():  # through the samples and the report too: they are files of the run
            result = trainer.train()
            return finish(config, trainer, result, list(sys.argv[1:] if argv is None else argv), main_process)
    finally:
        trainer.close()


def resume_command(given: list[str], out: Path) -> list[str]:
    """The flags that continue this run in `out`: the same ones, with --resume auto (a checkpoint of another run
    that it was started from would be refused now: the run has files of its own), and --out if they lack it (it
    came from the checkpoint resumed, which --resume auto no longer names)."""
    flags = list(given)
    if not any(flag == "--out" or flag.startswith("--out=") for flag in flags):
        flags += ["--out", str(out)]
    for i, flag in enumerate(flags):
        if flag == "--resume" and i + 1 < len(flags):
            flags[i + 1] = "auto"
            return flags
        if flag.startswith("--resume="):
            flags[i] = "--resume=auto"
            return flags
    return [*flags, "--resume", "auto"]


def launcher() -> str:
    """What started this run: python, or torchrun with as many processes (its rendezvous options are the user's)."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world == 1:
        return "python"
    if world == local:
        return f"torchrun --nproc_per_node {world}"
    return f"torchrun --nnodes {world // local} --nproc_per_node {local} <the rendezvous options you launched with>"


def script(name: str) -> str:
    """The path of `name` (this script or one beside it) to type from the current directory, shell-quoted."""
    path = os.path.relpath(Path(__file__).resolve().with_name(name))
    return shlex.quote(path if not path.startswith("..") else str(Path(__file__).resolve().with_name(name)))


def finish(config: TrainConfig, trainer, result, given: list[str], main_process: bool) -> int:
    """Say how the run ended and where its model is; sample from it and write the before/after report."""
    from minigpt2 import GPT

    if not main_process:
        return 0
    if result.stopped_by in EXIT_CODES:
        resume = shlex.join(resume_command(given, result.out_dir))
        print(f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved in {result.last_checkpoint}."
              f"\nResume with: {launcher()} {script('train.py')} {resume}", flush=True)
        return EXIT_CODES[result.stopped_by]
    best = (f"best validation loss {result.best_val_loss:.4f} at {result.best_checkpoint}"
            if result.best_val_loss is not None else "no evaluation")
    print(f"\ndone: {result.step} steps{f' ({result.stopped_by})' if result.stopped_by else ''}; {best}")
    if result.model_dir is not None:
        if config.samples:
            print_samples(GPT.from_pretrained(result.model_dir).to(trainer.device), config)
        beside = "metrics.jsonl, loss.png" if (result.out_dir / "loss.png").exists() else "metrics.jsonl"
        print(f"the model is in {result.model_dir} ({beside} and checkpoints beside it); try:\n"
              f"  python {script('sample.py')} --model {shlex.quote(str(result.model_dir))} --prompt "
              f"{shlex.quote(PROMPTS[0])}")
    if result.model_dir is not None and config.report:
        write_before_after_report(config, trainer, result)
    return 0


if __name__ == "__main__":
    run_main(main)
