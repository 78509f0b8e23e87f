"""`python cli.py grow|tune|show|eval|export ...`: a thin shell over the library.

Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from grow.errors import GrowError, user_errors

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see: {self.prog} --help)\n")


def _count(text: str) -> int:
    from grow.cost import parse_count
    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `grow` and `tune`: data, budget, schedule, optimizer."""
    from grow.controller import GrowConfig
    d = GrowConfig()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset,
                   help="cifar10, cifar100, fashion-mnist, mnist, svhn, imagefolder or synthetic (default %(default)s)")
    g.add_argument("--data-dir", default=None, help="where the dataset lives (downloaded there when missing)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never try to download data")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the training set held out for growth decisions (default %(default)s)")
    g.add_argument("--train-subset", type=int, default=None, help="train on the first N training images only")
    g.add_argument("--augment", choices=("auto", "on", "off"), default="auto",
                   help="random crops and flips where the dataset allows them; auto: on for runs of 15 epochs or more")
    g = p.add_argument_group("budget (numbers take K/M/G suffixes)")
    g.add_argument("--budget-flops", "--budget-macs", dest="budget_macs", type=_count, default=None,
                   help="most multiply-accumulates per image in one forward pass (the 'FLOPs' of the literature)")
    g.add_argument("--budget-params", type=_count, default=None, help="most parameters")
    g = p.add_argument_group("growth")
    g.add_argument("--space", default=d.space, help="network family: vgg, resnet or mobilenet (default %(default)s)")
    g.add_argument("--epochs-per-round", type=int, default=d.epochs_per_round)
    g.add_argument("--max-rounds", type=int, default=d.max_rounds)
    g.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    g.add_argument("--tau", type=float, default=d.tau, help="selection ratio at which a layer is saturated")
    g.add_argument("--widen-ratio", type=float, default=d.widen_ratio, help="a saturated layer grows by this share")
    g.add_argument("--widen-min", type=int, default=d.widen_min, help="... and by at least this many filters")
    g.add_argument("--widen-init", choices=["split", "fresh"], default=d.widen_init,
                   help="new filters: copies of old ones sharing their outgoing weights (split), or random "
                        "with zero outgoing weights (fresh); default %(default)s")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--finetune-lr", type=float, default=None, help="default: --lr")
    g.add_argument("--kappa", type=float, default=d.kappa)
    g.add_argument("--mu", type=float, default=None, help="default: chosen from the round length (see --path-per-round)")
    g.add_argument("--path-per-round", type=float, default=d.path_per_round,
                   help="how far Gamma's path advances in one round, lr*steps/mu (default %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N (default %(default)s)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=d.precision,
                   help="autocast; auto: bf16 on CUDA GPUs (fp16 where bf16 is missing), fp32 on CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the network (again after each growth step; its time is reported apart)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="train in the NCHW layout instead of channels_last (NHWC)")


def config_from_args(args: argparse.Namespace, out: str):
    from grow.controller import GrowConfig
    fields = GrowConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["out"] = out
    return GrowConfig(**values)


def _reporter(args):
    from grow.report import JsonReporter, NullReporter, RichReporter
    if args.quiet:
        return NullReporter()
    return JsonReporter() if args.log_format == "json" else RichReporter()


def cmd_grow(args: argparse.Namespace) -> int:
    from grow.controller import GrowConfig, grow_network
    if args.resume:
        config_path = Path(args.resume) / "config.json"
        if not config_path.exists():
            raise GrowError(f"{args.resume} holds no grow run to resume (no config.json)")
        config = GrowConfig.from_dict(json.loads(config_path.read_text()))
        config.out = str(args.resume)
        given = config_from_args(args, config.out)
        ignored = [k for k in GrowConfig.__dataclass_fields__ if k != "out"
                   and getattr(given, k) != getattr(GrowConfig(), k) and getattr(given, k) != getattr(config, k)]
        if ignored and os.environ.get("RANK", "0") == "0":  # under torchrun, one note, not one per process
            print(f"note: --resume continues with the run's saved settings; ignoring "
                  f"{', '.join(_flag(k) for k in ignored)}", file=sys.stderr)
    else:
        config = config_from_args(args, args.out)
        if args.params:
            config = _apply_params(config, args.params)
    reporter = _reporter(args)
    try:
        result = grow_network(config, reporter, resume=bool(args.resume))
    finally:
        reporter.close()
    if args.quiet and os.environ.get("RANK", "0") == "0":
        print(f"test accuracy {result.test_accuracy:.4f}; model in {result.out / 'model.json'}")
    return 0


def _flag(field: str) -> str:
    return "--budget-flops" if field == "budget_macs" else "--" + field.replace("_", "-")


def _apply_params(config, path: str):
    """Take kappa, lr, mu, tau ... from a best.json written by `tune`."""
    try:
        params = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GrowError(f"cannot read parameters from {path}: {err}") from None
    params = params.get("params", params)
    unknown = [k for k in params if not hasattr(config, k)]
    if unknown:
        raise GrowError(f"{path} names parameters grow does not know: {', '.join(unknown)}")
    for key, value in params.items():
        setattr(config, key, value)
    return config


def cmd_show(args: argparse.Namespace) -> int:
    from grow.inspect import show_model
    show_model(args.model, batch_size=args.batch_size)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from grow.inspect import evaluate_model
    result = evaluate_model(args.model, args.dataset, args.data_dir, device=args.device, download=args.download)
    print(json.dumps(result) if args.log_format == "json" else
          f"{result['dataset']} test accuracy {result['accuracy']:.4f} ({result['images']} images), loss {result['loss']:.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from grow.deploy import export_model
    result = export_model(args.model, args.format, args.out, batch=args.batch, dynamic_batch=args.dynamic_batch,
                          data_dir=args.data_dir, latency=not args.no_latency)
    print("\n".join(result.summary_lines()))
    return 0


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tuning")
    g.add_argument("--trials", type=int, default=20, help="trials this command adds to the study (default %(default)s)")
    g.add_argument("--out", default="runs/tune", help="folder for the journal, trials, best.json (default %(default)s)")
    g.add_argument("--storage", default=None,
                   help="Optuna storage URL (sqlite:///study.db, postgresql://user@host/db); default: a journal file in --out")
    g.add_argument("--study-name", default="grow", help="processes with the same storage and name share one study")
    g.add_argument("--workers", type=int, default=1, help="processes on this machine (default %(default)s)")
    g.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    g.add_argument("--search", default="", help="also search: mu (the path speed), tau; comma separated")
    g.add_argument("--objectives", default="accuracy", help="accuracy, or accuracy,macs for a Pareto front")
    g.add_argument("--sampler-seed", type=int, default=0)


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def cmd_tune(args: argparse.Namespace) -> int:
    import optuna

    from grow.tune import TuneConfig, print_summary, run_study
    config = TuneConfig(base=config_from_args(args, str(Path(args.out) / "trials")), trials=args.trials,
                        out=args.out, storage=args.storage, study_name=args.study_name, search=_names(args.search),
                        pruner=args.pruner, objectives=_names(args.objectives), sampler_seed=args.sampler_seed,
                        workers=args.workers)
    if args.quiet or args.log_format == "json":
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = run_study(config)
    best = json.loads((Path(config.out) / "best.json").read_text())
    if args.log_format == "json":
        print(json.dumps({"event": "tune_finish", "trials": len(study.trials), **best}))
    elif args.quiet:
        print(f"{len(study.trials)} trials; best val accuracy {best['value']:.4f}; {Path(config.out) / 'best.json'}")
    else:
        print_summary(study, config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="grow", description="Grow compact CNNs along the DessiLBI path.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("grow", help="grow a network to a budget, fine-tune and export it")
    add_run_arguments(p)
    p.add_argument("--out", default="runs/grow", help="run folder (default %(default)s)")
    p.add_argument("--resume", metavar="DIR", default=None, help="continue the run in DIR from its last finished round")
    p.add_argument("--params", metavar="BEST_JSON", default=None, help="take tuned parameters from tune's best.json")
    _add_output_flags(p)
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("tune", help="tune kappa and lr (and mu, tau) with Optuna")
    add_run_arguments(p)
    add_tune_arguments(p)
    _add_output_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("show", help="per-layer table of a grown model, with measured latency")
    p.add_argument("model", help="model.json or its folder")
    p.add_argument("--batch-size", type=int, default=64, help="batch for the throughput figure")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("eval", help="test accuracy of a grown model")
    p.add_argument("model", help="model.json or its folder")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="ONNX, torch.export (.pt2) or TorchScript file of a grown model, verified")
    p.add_argument("model", help="model.json or its run folder")
    p.add_argument("--format", required=True, choices=("onnx", "pt2", "torchscript"))
    p.add_argument("--out", default=None,
                   help="file to write (default: model.onnx, model.pt2 or model.torchscript.pt beside model.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batch", type=int, default=None, help="fixed batch size of the file (default 1)")
    g.add_argument("--dynamic-batch", action="store_true", help="the file takes any batch size")
    p.add_argument("--data-dir", default=None, help="where the model's dataset lives, for checking on real images")
    p.add_argument("--no-latency", action="store_true", help="skip timing PyTorch and the exported file")
    p.set_defaults(func=cmd_export)
    return parser


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no live display; one line at the end")
    p.add_argument("--log-format", choices=("rich", "json"), default="rich",
                   help="rich: live display; json: one JSON object per line and event")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; user errors become one line and an exit code, Ctrl-C a clean stop."""
    try:
        return func(args)
    except KeyboardInterrupt:
        where = getattr(args, "out", None) or getattr(args, "resume", None)
        hint = f"; continue with: python cli.py grow --resume {where}" if args.command == "grow" and where else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
