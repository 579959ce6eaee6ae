"""The distill progress bar: stage, requests done of the stage, tokens, drops, time left."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StageBar:
    """One bar, restarted for each stage; every teacher reply advances it."""

    def __init__(self, progress: Progress, teacher, drops):
        self.progress, self.teacher, self.drops = progress, teacher, drops
        self.task = progress.add_task("starting", total=None, info="")
        teacher.on_reply = self.advance

    def stage(self, name: str, total: int) -> None:
        self.progress.reset(self.task, description=name, total=total or None)

    def advance(self) -> None:
        u = self.teacher.usage
        info = (
            f"{u.sent} sent · {u.from_ledger} from ledger · "
            f"{u.prompt_tokens + u.completion_tokens} tokens · "
            f"{sum(self.drops.values())} dropped"
        )
        self.progress.update(self.task, advance=1, info=info)


@contextlib.contextmanager
def distill_progress(teacher, drops, console: Console) -> Iterator[StageBar]:
    columns = (
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        yield StageBar(progress, teacher, drops)
