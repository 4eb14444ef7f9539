"""
flags.py -- command lines: a dataclass of settings becomes the --flags of a script, and bad
input becomes one clear line.

    @dataclass
    class SFTConfig(TrainConfig):                     # TrainConfig: the flags every stage shares
        data: str = arg("", "training conversations (.jsonl)")     # a new flag, with its --help
        lr: float = 1e-3                              # a shared flag with this stage's default
                                                      # (its --help comes from TrainConfig)
    cfg = parse_config(SFTConfig, "what the script does", argv)

    main_guard(main)      # ValueError / FileNotFoundError -> "error: ..." on one line, exit 2

A stage thus shows its own defaults as plain values, and `--help` stays the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import field
from typing import Callable, Optional

from model import ModelConfig


def arg(default, help: str, **kwargs):
    """A config field with its --help text (and optional argparse extras such as choices)."""
    return field(default=default, metadata={"help": help, **kwargs})


def flag_metadata(cls, name: str) -> dict:
    """The --help and argparse extras of field `name`: its own, else those of the nearest parent
    class that declares them (a stage that only changes a shared flag's default keeps its help)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return dict(f.metadata)
    return {}


def explicit_flags(argv: list[str]) -> set[str]:
    """The names of the flags given on a command line: --lr 1e-3, --lr=1e-3, --no-compile -> lr, compile."""
    names = set()
    for a in argv:
        if a.startswith("--"):
            name = a[2:].split("=")[0]
            names.add(name[3:] if name.startswith("no-") else name)
    return names


def add_flags(parser: argparse.ArgumentParser, cls) -> list[str]:
    """Add a --flag for every field of dataclass `cls` that has --help text; return their names."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        meta = flag_metadata(cls, f.name)
        help_text = meta.pop("help", None)
        if help_text is None:
            continue                                   # not a flag (e.g. vocab_size: set from the tokenizer)
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Union:    # Optional[int] -> int, default None
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        value_type = meta.pop("type", hint)
        nargs = meta.pop("nargs", None)                # "*" or "+": a list of values (--target_modules q_proj v_proj)
        if value_type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=value_type, default=f.default, help=help_text,
                                **({"nargs": nargs} if nargs else {}), **meta)
        names.append(f.name)
    return names


def parse_config(cls, description: str, argv=None, presets: Optional[dict[str, dict]] = None,
                 model_flags: bool = False):
    """Parse argv into an instance of dataclass `cls` (every field with --help text is a --flag;
    bools get --name / --no-name).

    presets: --preset NAME first replaces defaults by the preset's values; flags given
    explicitly still win. model_flags: the architecture flags of model.ModelConfig too
    (pretrain.py); then returns (cfg, {model flag: value}).
    """
    argv = list(argv if argv is not None else sys.argv[1:])
    own = {f.name for f in dataclasses.fields(cls)}
    if not model_flags:
        check_architecture_flags(own, argv)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a named set of defaults; flags given explicitly override it")
    cfg_names = add_flags(parser, cls)
    model_names = add_flags(parser.add_argument_group("model (see model.ModelConfig)"), ModelConfig) \
        if model_flags else []
    values = vars(parser.parse_args(argv))
    preset = values.pop("preset", None)
    if preset:
        given = explicit_flags(argv)
        for name, value in presets[preset].items():   # a preset changes only what was not given
            if name not in given:
                values[name] = value
    cfg = cls(**{name: values[name] for name in cfg_names})
    cfg.preset = preset
    if model_flags:
        return cfg, {name: values[name] for name in model_names}
    return cfg


def check_architecture_flags(own: set[str], argv: list[str]):
    """A model-architecture flag (--n_experts, --n_encoder_layer, ...) on a stage that takes its model
    from a checkpoint gets one line saying why it cannot apply, instead of argparse's 'unrecognized'."""
    architecture = {f.name for f in dataclasses.fields(ModelConfig)}
    for name in sorted((explicit_flags(argv) & architecture) - own):
        raise ValueError(f"--{name} is an architecture flag, but this stage takes its model from --init_from, "
                         f"whose config.json fixes the architecture: pretrain that kind of model first "
                         f"(python pretrain.py --{name} ...) and start from it with --init_from")


def main_guard(main: Callable, processes: bool = False):
    """Run main(); bad input (ValueError, FileNotFoundError) becomes one line on stderr.

    Set WORKSHOP_DEBUG=1 to see the full traceback instead. processes=True (the training
    stages): `--nproc N` runs the stage as N processes (see launch).
    """
    nproc = pop_nproc(sys.argv) if processes else None
    if nproc is not None:
        return launch(nproc, sys.argv)
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("WORKSHOP_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:            # under torchrun every process gets Ctrl-C: one of them says so
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:          # output piped into a reader that stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        sys.exit(0)


def pop_nproc(argv: list[str]) -> Optional[int]:
    """Take `--nproc N` (or --nproc=N) out of argv; N, or None when it is not there."""
    for i, a in enumerate(argv):
        if a == "--nproc" or a.startswith("--nproc="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i:i + (1 if "=" in a else 2)]
            if not value.isdigit() or int(value) < 1:
                print(f"error: --nproc takes a number of processes, 1 or more, got {value!r}", file=sys.stderr)
                sys.exit(2)
            if "LOCAL_RANK" in os.environ:
                print("error: --nproc inside torchrun: use one or the other", file=sys.stderr)
                sys.exit(2)
            return int(value)
    return None


def launch(nproc: int, argv: list[str]):
    """`python pretrain.py --nproc 2 ...` = `torchrun --standalone --nproc_per_node 2 pretrain.py ...`:
    torch's own launcher starts the processes (DDP: each takes its share of every batch), but
    Ctrl-C and a failing process each end in one line here; torchrun's launcher answers both
    with a traceback of its own, after the stage's one-line message."""
    import logging

    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # its notes; ours is one line
    try:
        run.main(["--standalone", "--nproc_per_node", str(nproc), *argv])
    except SignalException:              # Ctrl-C: the processes were stopped; process 0 said how to resume
        sys.exit(130)
    except ChildFailedError as e:        # the failing process printed its own error line already
        codes = [failure.exitcode for failure in e.failures.values() if failure.exitcode > 0]
        code = min(codes) if codes else 1          # (the others were stopped by the launcher: negative codes)
        print(f"error: a process of {nproc} failed (exit {code}) and the others were stopped: its message is above",
              file=sys.stderr)
        sys.exit(code)
