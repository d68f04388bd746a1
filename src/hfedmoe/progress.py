"""Live progress of a run in the terminal (rich): one line per round, a bar over rounds."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hfedmoe.config import RunConfig


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class RichReporter:
    """Receives run events from the server and prints them as they happen."""

    def __init__(self, cfg: RunConfig, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console(stderr=False)
        self.progress = Progress(
            TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        self.task = None

    def on_start(self, info: dict) -> None:
        self.console.print(
            f"[bold]hfedmoe[/bold] {self.cfg.method}: {info['clients']} clients"
            + (f" ({info['clients_per_round']} per round)" if info.get("clients_per_round", info["clients"])
               < info["clients"] else "")
            + f", {info['rounds']} rounds, "
            f"{info['moe_layers']} MoE layers x {info['experts_per_layer']} experts, "
            f"expert budgets {info['budgets']}"
            + (f", memory budgets {[f'{m / 1e6:.0f} MB' for m in info['mem_budgets']]}"
               if any(info.get("mem_budgets") or []) else "")
            + (f"\ndata: {info['client_data']}, evaluation {info['evaluation']}" if "evaluation" in info else "")
            + f"\nrun directory: {info['run_dir']}"
        )
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=self.cfg.rounds)

    def on_round(self, row: dict) -> None:
        clients = row.get("clients", [])
        trained = " ".join(f"{c['experts_trained']:.0f}/{c['expert_budget']}" for c in clients)
        extra = f"  up {_mb(row['bytes_up'])} down {_mb(row['bytes_down'])}  experts/batch {trained}" if clients else ""
        failed = f"  [red]{len(row['failures'])} client(s) failed[/red]" if row.get("failures") else ""
        over = [c for c in clients if c.get("over_budget")]
        if over:
            failed += "  [red]over memory budget: " + ", ".join(
                f"client {c['id']} {c['peak_mem_bytes'] / 1e6:.0f}/{c['mem_budget_bytes'] / 1e6:.0f} MB" for c in over
            ) + "[/red]"
        self.console.print(
            f"round {row['round']:>3}  accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}  "
            + (f"perplexity {row['perplexity']:.2f}  " if "perplexity" in row else "")
            + f"{row['wall_s']:7.1f}s{extra}{failed}"
        )
        if self.task is not None and row["round"] > 0:
            self.progress.update(self.task, completed=row["round"])

    def on_end(self, summary: dict) -> None:
        self.progress.stop()
        self.console.print(
            f"[bold green]done[/bold green]: final accuracy {summary['final_accuracy']:.4f} "
            f"(best {summary['best_accuracy']:.4f}) in {summary['wall_s']:.0f}s; "
            f"uploaded {_mb(summary['bytes_up'])}; results in {summary['run_dir']}"
        )
