"""What a run shows while it works: nothing (quiet), JSON lines (scripts, CI), or a live rich display."""
from __future__ import annotations

import json
import sys
from typing import Any, Optional, TextIO


def human(n: float) -> str:
    """12345678 -> '12.3M' (K/M/G, base 1000, as budgets are written)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


LAYER_COLUMNS = ("layer", "kind", "in", "out", "kernel", "stride", "output", "MACs", "params", "share of MACs")


def layer_table(info: dict, width: int):
    """The per-layer table of `show` laid out for a terminal `width` columns wide.

    Wide terminals get the full table. Narrower ones get, in turn: a lighter frame and short headers;
    then kernel/stride in one column and names without the '.conv' every conv layer ends in; and last,
    names folded onto two lines. Nothing is cut to an ellipsis; `show --format json` has every full name."""
    from rich import box

    rows = [_layer_cells(row, info["macs"]) for row in info["layers"]]
    layouts = (dict(box=box.HEAVY_HEAD, short=False, merge=False, fold=False),
               dict(box=box.SIMPLE_HEAD, short=True, merge=False, fold=False),
               dict(box=box.SIMPLE_HEAD, short=True, merge=True, fold=False))
    for layout in layouts:
        table = _table(info, rows, **layout)
        if _rendered_width(table) <= width:
            return table
    return _table(info, rows, box=box.SIMPLE_HEAD, short=True, merge=True, fold=True)


def _layer_cells(row: dict, total_macs: int) -> dict:
    return {"layer": row["name"], "kind": row["kind"], "in": str(row["in"]), "out": str(row["out"]),
            "kernel": str(row.get("kernel", "")), "stride": str(row.get("stride", "")),
            "output": str(row.get("output", "")), "MACs": human(row["macs"]), "params": human(row["params"]),
            "share of MACs": f"{row['macs'] / max(total_macs, 1):.1%}"}


def _table(info: dict, rows: list[dict], *, box, short: bool, merge: bool, fold: bool):
    from rich.table import Table

    title = f"{info['space']} {tuple(info['input_shape'])} -> {info['num_classes']} classes"
    caption = "k/s: kernel/stride; conv layers' names without '.conv'" if merge else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left", box=box,
                  collapse_padding=short, pad_edge=not short)
    headers = {"kernel": "k", "stride": "s", "share of MACs": "share"} if short else {}
    columns = [c for c in LAYER_COLUMNS if not (merge and c == "stride")]
    for col in columns:
        name = "k/s" if merge and col == "kernel" else headers.get(col, col)
        if col == "layer":
            table.add_column(name, no_wrap=not fold, overflow="fold", min_width=12 if fold else None)
        else:
            table.add_column(name, justify="left" if col == "kind" else "right", no_wrap=True)
    for cells in rows:
        if merge:
            cells = {**cells, "kernel": f"{cells['kernel']}/{cells['stride']}" if cells["kernel"] else "",
                     "layer": cells["layer"].removesuffix(".conv")}
        table.add_row(*(cells[c] for c in columns))
    return table


def _rendered_width(table) -> int:
    """Columns `table` takes when nothing limits it (its title and caption wrap, so they do not count)."""
    import io

    from rich.console import Console
    from rich.measure import Measurement

    console = Console(file=io.StringIO(), width=10_000)
    return Measurement.get(console, console.options, table).maximum


class Reporter:
    """Receives the events of a run; the base class ignores them all (the quiet mode)."""

    def start(self, config, info, device) -> None: ...
    def message(self, text: str) -> None: ...
    def round_start(self, index: int, max_rounds: int, spec, macs: int, params: int) -> None: ...
    def phase(self, name: str, epochs: int) -> None: ...
    def epoch_start(self, label: str, batches: int) -> None: ...
    def batch(self, done: int, total: int, loss: float, accuracy: float) -> None: ...
    def epoch_end(self, record: dict) -> None: ...
    def round_end(self, record: dict, units: list) -> None: ...
    def finish(self, history: dict, metrics: dict) -> None: ...
    def close(self) -> None: ...


NullReporter = Reporter


class QuietReporter(Reporter):
    """`--quiet`: no progress, but a note that something was wrong (a damaged checkpoint skipped, too
    little data) still reaches stderr."""

    def message(self, text: str) -> None:
        if text.startswith("note:"):
            print(text, file=sys.stderr)


class JsonReporter(Reporter):
    """One JSON object per line and event, for scripts and CI logs."""

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stdout  # the stdout of when the run starts (a redirected one included)

    def _emit(self, event: str, **data: Any) -> None:
        self.stream.write(json.dumps({"event": event, **data}, default=str) + "\n")
        self.stream.flush()

    def start(self, config, info, device) -> None:
        self._emit("start", dataset=info.name, input_shape=list(info.input_shape),
                   num_classes=info.num_classes, device=str(device), config=config.to_dict())

    def message(self, text: str) -> None:
        self._emit("message", text=text)

    def round_start(self, index, max_rounds, spec, macs, params) -> None:
        self._emit("round_start", round=index, max_rounds=max_rounds, macs=macs, params=params)

    def phase(self, name, epochs) -> None:
        self._emit("phase", name=name, epochs=epochs)

    def epoch_end(self, record) -> None:
        self._emit("epoch", **{k: v for k, v in record.items() if k != "selection_path"})  # in history.json

    def round_end(self, record, units) -> None:
        keep = ("round", "macs", "params", "widths", "val_accuracy", "train_accuracy", "actions", "notes", "stop", "seconds")
        self._emit("round_end", **{k: record[k] for k in keep if k in record},
                   selection_ratio=record["epochs"][-1]["selection_ratio"])

    def finish(self, history, metrics) -> None:
        self._emit("finish", **metrics)


class RichReporter(Reporter):
    """Live progress bar per epoch, a layer table per round, a summary at the end."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  {task.fields[speed]}"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.task: Optional[int] = None

    def start(self, config, info, device) -> None:
        budget = ", ".join(b for b in (
            config.budget_macs and f"{human(config.budget_macs)} MACs",
            config.budget_params and f"{human(config.budget_params)} params") if b) or "none"
        self.console.print(
            f"[bold]grow[/] {config.space} on {info.name} {tuple(info.input_shape)} "
            f"{info.num_classes} classes, budget {budget}, device {device}, out {config.out}")

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)  # one line, paths whole, whatever the width

    def round_start(self, index, max_rounds, spec, macs, params) -> None:
        self.console.rule(f"round {index}/{max_rounds}: {human(macs)} MACs, {human(params)} params")

    def phase(self, name, epochs) -> None:
        self.console.rule(f"{name}: {epochs} epochs")

    def epoch_start(self, label, batches) -> None:
        if self.task is None:
            self.progress.start()
        else:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(label, total=batches, loss=0.0, acc=0.0, speed="")
        self._t0 = None

    def batch(self, done, total, loss, accuracy) -> None:
        import time
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._d0 = now, done
            speed = ""
        else:
            speed = f"{(done - self._d0) / max(now - self._t0, 1e-9):.1f} batch/s"
        self.progress.update(self.task, completed=done, loss=loss, acc=accuracy, speed=speed)

    def epoch_end(self, record) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
            self.progress.stop()
        self.console.print(
            f"  epoch {record['epoch']}: train loss {record['train_loss']:.3f} acc {record['train_accuracy']:.3f}"
            + (f" | val loss {record['val_loss']:.3f} acc {record['val_accuracy']:.3f}"
               if record.get("val_accuracy") is not None else " | on train + val")
            + f" | {record['images_per_second']:.0f} img/s")

    def round_end(self, record, units) -> None:
        from rich.table import Table

        ratios = record["epochs"][-1]["selection_ratio"]
        acted: dict[str, list[str]] = {}
        whole = []  # actions on a stage (deepen, extend): a row of their own
        for a in record["actions"]:
            text = f"{a['kind']} {a['before']}->{a['after']}"
            if a["kind"] == "widen":
                acted.setdefault(a["target"], []).append(text)
            else:
                whole.append((a["target"], text))
        table = Table(title=f"round {record['round']}: val acc {record['val_accuracy']:.3f}", title_justify="left")
        table.add_column("layer", no_wrap=True)
        for col in ("kind", "stage", "width", "selection ratio", "action"):
            table.add_column(col, justify="right" if col in ("width", "stage", "selection ratio") else "left")
        for u in units:
            table.add_row(u.name, u.kind, str(u.stage), str(u.width), f"{ratios.get(u.name, 0):.2f}",
                          ", ".join(acted.get(u.name, [])) or "-")
        for target, text in whole:
            table.add_row(target, "stage", target.split()[-1], "", "", text)
        self.console.print(table)
        for note in record.get("notes", []):
            self.console.print(f"  note: {note}")
        if "stop" in record:
            self.console.print(f"  growth stops: {record['stop']}")

    def finish(self, history, metrics) -> None:
        from rich.table import Table

        table = Table(title="grown network", title_justify="left")
        for col in ("round", "MACs", "params", "val acc", "actions"):
            table.add_column(col, justify="left" if col == "actions" else "right")
        for r in history["rounds"]:
            table.add_row(str(r["round"]), human(r["macs"]), human(r["params"]), f"{r['val_accuracy']:.3f}",
                          "; ".join(f"{a['kind']} {a['target']} {a['before']}->{a['after']}" for a in r["actions"]) or "-")
        self.console.print(table)
        final = history.get("final", {})
        self.console.print(
            f"[bold]test accuracy {metrics['test_accuracy']:.4f}[/] | {human(final.get('macs', 0))} MACs, "
            f"{human(final.get('params', 0))} params | {metrics['epochs']} epochs | model: {final.get('model_json', '')}",
            soft_wrap=True)  # never break the line between "model:" and its path (scripts grep it)

    def close(self) -> None:
        if self.progress.live.is_started:  # the terminal gets its cursor back however the run ended
            try:
                self.progress.stop()
            except IndexError:  # a signal arrived inside Live.start(), before it pushed its render hook
                self.console.show_cursor(True)
