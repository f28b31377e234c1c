"""Progress bars for the long offline steps (rich), silent when asked or not on a terminal."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressBar:
    """One task's bar; `advance` may carry a few figures (e.g. the epoch loss) to show."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(label, total=total, info="")

    def advance(self, **figures: float) -> None:
        if self._progress is not None:
            info = " ".join(f"{k}={v:.4g}" for k, v in figures.items())
            self._progress.update(self._task, advance=1, info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def progress_bar(total: int, label: str, enabled: bool = True) -> ProgressBar:
    return ProgressBar(total, label, enabled)
