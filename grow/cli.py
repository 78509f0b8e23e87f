"""`python cli.py grow|tune|show|eval|export ...`: a thin shell over the library.

Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from grow.errors import GrowError, mask_secrets, user_errors

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BUG = 1


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
                   help="cifar10, cifar100, fashion-mnist, mnist, svhn, imagefolder, imagenet or synthetic "
                        "(default %(default)s)")
    g.add_argument("--data-dir", default=None, help="where the dataset lives (downloaded there when missing)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never try to download data")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the training set held out for growth decisions (default %(default)s)")
    g.add_argument("--train-subset", type=int, default=None, help="train on the first N training images only")
    g.add_argument("--augment", choices=("auto", "on", "off"), default="auto",
                   help="random crops and flips where the dataset allows them; auto: on for runs of 15 epochs or more")
    g.add_argument("--stream", dest="stream", action="store_const", const="on", default=d.stream,
                   help="imagefolder/imagenet: decode the pictures from disk every epoch in DataLoader workers "
                        "(default: only when decoded they would take more than a quarter of the free memory, "
                        "or $GROW_STREAM_ABOVE bytes)")
    g.add_argument("--no-stream", dest="stream", action="store_const", const="off",
                   help="imagefolder/imagenet: hold the pictures in memory, however large")
    g.add_argument("--image-size", type=int, default=None,
                   help="train on pictures this many pixels a side: imagefolder/imagenet pictures are cropped "
                        "(or resized) to it, the other datasets' resized (default: imagenet 224, every other "
                        "dataset its pictures' own size)")
    g.add_argument("--data-workers", type=int, default=None,
                   help="DataLoader worker processes decoding streamed pictures (default: from the CPU cores)")
    g = p.add_argument_group("budget (numbers take K/M/G suffixes)")
    g.add_argument("--budget-flops", "--budget-macs", dest="budget_macs", type=_count, default=None,
                   help="most multiply-accumulates per image in one forward pass (the 'FLOPs' of the literature)")
    g.add_argument("--budget-params", type=_count, default=None, help="most parameters")
    g = p.add_argument_group("growth")
    g.add_argument("--space", default=d.space, help="network family: vgg, resnet or mobilenet (default %(default)s)")
    g.add_argument("--seed-shape", choices=("small", "classic"), default=d.seed_shape,
                   help="start from the family's small seed, or from its classic member (VGG-11, ResNet-20, "
                        "MobileNetV2) narrowed to --seed-fraction of the budget (default %(default)s)")
    g.add_argument("--order", choices=("ratio", "cost"), default=d.order,
                   help="which asked-for growth steps go first: most saturated (ratio) or cheapest, by their "
                        "share of the budget (cost)")
    g.add_argument("--deepen", choices=("after-widen", "with-widen"), default=d.deepen,
                   help="a saturated stage deepens in the round its layers widen (with-widen), or only once they "
                        "were widened and saturate again (after-widen); default %(default)s")
    g.add_argument("--pace-rounds", type=int, default=d.pace_rounds,
                   help="spread the budget evenly over rounds 1..N (0: spend it as soon as layers ask)")
    g.add_argument("--fill-by", type=int, default=d.fill_by,
                   help="after round N, spend the rest of the budget at once (every layer widened by one factor) "
                        "and end growth (0: never; default: half of --max-rounds, rounded up)")
    g.add_argument("--deepen-per-round", type=int, default=d.deepen_per_round,
                   help="at most this many stages deepen in one round, the cheapest first (0: no limit; "
                        "default %(default)s)")
    g.add_argument("--extend-stages", action=argparse.BooleanOptionalAction, default=d.extend_stages,
                   help="a saturated last stage may be followed by a new stage at half its resolution "
                        "(default %(default)s)")
    g.add_argument("--seed-fraction", type=float, default=d.seed_fraction,
                   help="share of the budget the classic-shaped seed costs (default %(default)s)")
    g.add_argument("--seed-share", type=float, default=d.seed_share,
                   help="where the budget cannot pay for the small seed plus the new stage growth would add, "
                        "the seed is narrowed (every width by one factor) to this share of the budget, so "
                        "growth has room to decide (default 1/3)")
    g.add_argument("--epochs-per-round", type=int, default=d.epochs_per_round)
    g.add_argument("--round-steps", type=int, default=d.round_steps,
                   help="most batches one round trains, however large the dataset; the fine-tune trains the "
                        "rest of the round's epochs (0: whole epochs; default %(default)s)")
    g.add_argument("--max-rounds", type=int, default=d.max_rounds)
    g.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                   help="epochs of the dense fine-tune after growth: in all a run trains the batches of "
                        "max-rounds x epochs-per-round + this many epochs, the rounds' batches included "
                        "(default %(default)s)")
    g.add_argument("--tau", type=float, default=d.tau, help="selection ratio at which a layer is saturated")
    g.add_argument("--widen-ratio", type=float, default=d.widen_ratio, help="a saturated layer grows by this share")
    g.add_argument("--widen-min", type=int, default=d.widen_min, help="... and by at least this many filters")
    g.add_argument("--widen-init", choices=["split", "fresh"], default=d.widen_init,
                   help="new filters: copies of old ones sharing their outgoing weights (split), or random "
                        "with zero outgoing weights (fresh); default %(default)s")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                   help="peak lr of the fine-tune's one-cycle schedule (default %(default)s)")
    g.add_argument("--finetune-warmup", type=float, default=d.finetune_warmup,
                   help="share of the fine-tune's steps spent rising to that peak (default %(default)s)")
    g.add_argument("--kappa", type=float, default=d.kappa)
    g.add_argument("--mu", type=float, default=None, help="default: chosen from the round length (see --path-per-round)")
    g.add_argument("--path-per-round", type=float, default=d.path_per_round,
                   help="how far Gamma's path advances in one round, lr*steps/mu (default %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="default: from the number of labelled pictures, 5e-4 up to 10,000, then falling as "
                        "one over their number to 1e-4 at 50,000 and more")
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
    from grow.report import JsonReporter, QuietReporter, RichReporter
    if args.quiet:
        return QuietReporter()
    return JsonReporter() if args.log_format == "json" else RichReporter()


def cmd_grow(args: argparse.Namespace) -> int:
    from grow.controller import GrowConfig, grow_network
    if args.resume and args.overwrite:
        raise GrowError("--resume continues a run and --overwrite starts one again; give one of them")
    if args.resume:
        from grow.rundir import load_run_config
        config = load_run_config(Path(args.resume))
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
        result = grow_network(config, reporter, resume=bool(args.resume), overwrite=args.overwrite)
    finally:
        reporter.close()
    if args.quiet and os.environ.get("RANK", "0") == "0":
        print(f"test accuracy {result.test_accuracy:.4f}; model in {result.out / 'model.json'}")
    return 0


def _flag(field: str) -> str:
    return "--budget-flops" if field == "budget_macs" else "--" + field.replace("_", "-")


def _apply_params(config, path: str):
    """Take kappa, lr, mu, tau ... from a best.json written by `tune`."""
    from grow.guards import check_types
    try:
        params = json.loads(Path(path).read_text())
    except OSError as err:
        raise GrowError(f"cannot read parameters from {path}: {err.strerror}") from None
    except (ValueError, RecursionError):
        raise GrowError(f"{path} is not a JSON file of parameters (tune writes one as best.json)") from None
    params = params.get("params", params) if isinstance(params, dict) else params
    if not isinstance(params, dict):
        raise GrowError(f"{path} must hold a JSON object of parameters, like tune's best.json")
    unknown = [k for k in params if k == "out" or k not in type(config).__dataclass_fields__]
    if unknown:
        raise GrowError(f"{path} names parameters grow does not know: {', '.join(map(str, unknown))}")
    for key, value in params.items():
        setattr(config, key, value)
    try:
        check_types(config)
    except GrowError as err:
        raise GrowError(f"{path}: {err}") from None
    return config


def cmd_show(args: argparse.Namespace) -> int:
    from grow.inspect import show_model, summarize_model
    if args.batch_size < 1:
        raise GrowError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.format == "json":  # full layer names and every figure, for scripts
        print(json.dumps(summarize_model(args.model, batch_size=args.batch_size, runtimes=args.runtime)))
    else:
        show_model(args.model, batch_size=args.batch_size, runtimes=args.runtime)
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


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `prune`: the network, data, budget, the DessiLBI path, the ticket, the optimizer."""
    from grow.pruning import PruneConfig
    d = PruneConfig()
    g = p.add_argument_group("network to prune (one of)")
    g.add_argument("--from", dest="from_model", metavar="MODEL_JSON", help="a model.json or run folder (weights kept)")
    g.add_argument("--space", help="or a family's classic member, freshly initialised: the family (vgg, resnet, "
                                   "mobilenet) ...")
    g.add_argument("--arch", help="... and the member (resnet20/32/56/110, vgg11/16, mobilenetv2)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset)
    g.add_argument("--data-dir", default=None)
    g.add_argument("--no-download", dest="download", action="store_false")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction)
    g.add_argument("--train-subset", type=int, default=None)
    g.add_argument("--augment", choices=("auto", "on", "off"), default="auto")
    g.add_argument("--image-size", type=int, default=None,
                   help="pixels a side to read the pictures at (default: the --from model's, else the set's own)")
    g = p.add_argument_group("budget (numbers take K/M/G suffixes)")
    g.add_argument("--budget-flops", "--budget-macs", dest="budget_macs", type=_count, default=None,
                   help="most multiply-accumulates per image (the 'FLOPs' of the literature)")
    g.add_argument("--budget-params", type=_count, default=None, help="most parameters")
    g = p.add_argument_group("pruning")
    g.add_argument("--epochs", type=int, default=d.epochs, help="DessiLBI epochs before the cut (default %(default)s)")
    g.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                   help="SGD epochs after the cut; with --ticket, the retraining (default %(default)s)")
    g.add_argument("--path", type=float, default=d.path,
                   help="how far Gamma's path advances over --epochs, lr*steps/mu (default %(default)s)")
    g.add_argument("--rank", choices=("global", "layer"), default=d.rank,
                   help="global: filters of all layers compete on when Gamma selected them; layer: every layer "
                        "keeps the same share, its earliest-selected filters (default %(default)s)")
    g.add_argument("--ticket", action="store_true", help="early-stopped winning ticket: retrain Gamma's support")
    g.add_argument("--ticket-epoch", type=int, default=None,
                   help="take the ticket after this epoch (default: the last whose support fits the budget)")
    g.add_argument("--from-scratch", dest="rewind", action="store_false",
                   help="retrain the ticket from fresh weights instead of rewinding to the initial ones")
    g = p.add_argument_group("optimizer")
    for flag, default in (("--lr", d.lr), ("--kappa", d.kappa), ("--momentum", d.momentum),
                          ("--weight-decay", d.weight_decay)):
        g.add_argument(flag, type=float, default=default)
    g.add_argument("--mu", type=float, default=None, help="default: from --path")
    g.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="default: --lr")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device)
    g.add_argument("--out", default=d.out, help="run folder (default %(default)s)")


def cmd_prune(args: argparse.Namespace) -> int:
    from grow.pruning import PruneConfig, prune_network
    config = PruneConfig(**{k: v for k, v in vars(args).items() if k in PruneConfig.__dataclass_fields__})
    reporter = _reporter(args)
    try:
        result = prune_network(config, reporter)
    finally:
        reporter.close()
    if args.quiet:
        print(f"test accuracy {result.test_accuracy:.4f} (unpruned {result.unpruned_test_accuracy:.4f}); "
              f"model in {result.out / 'model.json'}")
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


def build_parser(prog: str = "grow") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Grow compact CNNs along the DessiLBI path.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("grow", help="grow a network to a budget, fine-tune and export it")
    add_run_arguments(p)
    p.add_argument("--out", default="runs/grow", help="run folder (default %(default)s)")
    p.add_argument("--resume", metavar="DIR", default=None, help="continue the run in DIR from its last finished round")
    p.add_argument("--params", metavar="BEST_JSON", default=None, help="take tuned parameters from tune's best.json")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run or a model (grow's files there are deleted first)")
    p.add_argument("--from", dest="from_model", metavar="MODEL_JSON", default=None,
                   help="continue growing this network (its weights warm-start the first round; its family "
                        "replaces --space) instead of the family's seed")
    _add_output_flags(p)
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("tune", help="tune kappa and lr (and mu, tau) with Optuna")
    add_run_arguments(p)
    add_tune_arguments(p)
    _add_output_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("prune", help="prune a network to a budget along the DessiLBI path, or take an early ticket")
    add_prune_arguments(p)
    _add_output_flags(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("show", help="per-layer table of a grown model, with measured latency")
    p.add_argument("model", help="model.json or its folder")
    p.add_argument("--batch-size", type=int, default=64, help="batch for the throughput figure")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table: laid out for the terminal's width; json: every figure and full layer names")
    p.add_argument("--runtime", action="append", default=[], choices=("onnxruntime", "pt2", "torchscript"),
                   help="also time the model in this runtime (repeatable); PyTorch eager is always timed")
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


def invoked_name(argv0: Optional[str] = None) -> str:
    """The command as the user typed it, for usage lines and hints: `grow` (the console script),
    `python cli.py` or `python -m grow`."""
    argv0 = argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "")
    name = Path(argv0).name
    if name == "__main__.py":
        return "python -m grow"
    if name.endswith(".py"):
        return f"python {argv0}"
    return "grow"


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = invoked_name() if argv is None else "grow"
    args = build_parser(prog).parse_args(argv)
    args.prog = prog
    with _signals_as_interrupts():
        return run_command(args.func, args)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, Kubernetes and `kill` send) or SIGHUP: stop like Ctrl-C, with that signal's code."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM (and SIGHUP, unless ignored as under nohup) unwind like Ctrl-C:
    `finally` blocks run, the live display gives the terminal its cursor back, checkpoints stay whole."""
    def handler(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
        raise Terminated(signum)

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in wanted:
            if signum == signal.SIGTERM or signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; every failure becomes one line on stderr and an exit code, never a traceback."""
    try:
        return func(args)
    except KeyboardInterrupt as err:
        return _interrupted(args, getattr(err, "signum", None))
    except user_errors() as err:
        return _fail(str(err))
    except MemoryError:
        return _fail("out of memory; try a smaller --batch-size, budget or dataset")
    except OSError as err:  # a full disk, a folder that vanished, a file another program locked
        where = f": {err.filename}" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}")
    except Exception as err:  # a bug: one line, and the traceback in a file for the report
        return _fail(f"unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} -- this is "
                     f"a bug in grow; the traceback is in {_save_traceback()}", EXIT_BUG)


def _fail(message: str, code: int = EXIT_USER_ERROR) -> int:
    print(f"error: {mask_secrets(message)}", file=sys.stderr)
    return code


def _interrupted(args: argparse.Namespace, signum: Optional[int]) -> int:
    """One line: what stopped the run, and `--resume` only when there is a checkpoint to resume."""
    what = "interrupted" if signum is None else f"stopped by {signal.Signals(signum).name}"
    where = getattr(args, "resume", None) or getattr(args, "out", None)
    hint = ""
    if args.command == "grow" and where:
        if (Path(where) / "checkpoint.json").exists():
            hint = f"; continue with: {getattr(args, 'prog', 'grow')} grow --resume {where}"
        else:
            hint = " before the first round finished; nothing to resume (run the same command again to start over)"
    print(f"{what}{hint}", file=sys.stderr)
    return EXIT_INTERRUPTED if signum is None else 128 + signum


def _save_traceback() -> str:
    import tempfile
    import traceback
    fd, path = tempfile.mkstemp(prefix="grow-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(mask_secrets(traceback.format_exc()))
    return path
