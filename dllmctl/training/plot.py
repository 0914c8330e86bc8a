"""``dllmctl metrics JOB --plot FILE.png``: the loss curve, drawn with matplotlib (the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path


def loss_plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise OSError("plotting needs matplotlib: pip install 'dllm[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    rows = [r for r in rows if r["loss"] is not None]  # a DP step whose Poisson batch was empty has no loss
    axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (mean over the global batch)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    plt.close(figure)
    tmp.replace(path)  # never a half-written image at the chosen name
