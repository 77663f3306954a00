"""What a person sees: live progress while training, tables at the end, and report.html: one
self-contained page per run or sweep (`write_report`)."""

from __future__ import annotations

from pathlib import Path

REPORT = "report.html"


def write_report(folder: str | Path) -> Path:
    """FOLDER/report.html for a run directory or a sweep directory (one with results.csv)."""
    from finetune import files

    folder = Path(folder)
    if (folder / "results.csv").is_file():
        from finetune.report.sweep import sweep_report

        text = sweep_report(folder)
    elif (folder / "config.yaml").is_file():
        from finetune.report.run import run_report

        text = run_report(folder)
    else:
        raise FileNotFoundError(f"{folder} is neither a run directory (config.yaml) nor a sweep directory (results.csv)")
    files.write_text(folder / REPORT, text)
    return folder / REPORT


def report_or_warn(folder: Path, console) -> None:
    """write_report at the end of `train` and `tune`: the model is saved by then, so a report that
    cannot be drawn is a warning naming the command that retries it, not a failed run."""
    from rich.markup import escape

    from finetune.report.progress import working

    try:
        with working(console, "writing the report"):
            path = write_report(folder)
        console.print(f"report: {path}", soft_wrap=True)
    except Exception as error:  # noqa: BLE001 - any drawing failure; the run itself succeeded
        console.print(f"[bold yellow]warning:[/] report.html not written ({type(error).__name__}: {escape(str(error))}); "
                      f"retry with: finetune report {folder}", highlight=False, soft_wrap=True)  # fmt: skip
