"""``dllmctl metrics JOB --plot FILE.png``: the training loss and, where the job evaluates held-out
data, the held-out loss, on integer step ticks; drawn with matplotlib (the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path


def loss_plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise OSError("plotting needs matplotlib: pip install 'dllm[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    trained = [r for r in rows if r["loss"] is not None]  # a DP step whose Poisson batch was empty has no loss
    axes.plot([r["step"] for r in trained], [r["loss"] for r in trained], color="tab:blue", linewidth=1.5,
              label="training loss (global batch)")
    evaluated = [r for r in rows if "eval_loss" in r]
    if evaluated:
        axes.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], color="tab:orange",
                  linewidth=1.5, marker="o", markersize=4, label="held-out loss")
    heldout = [r for r in rows if "heldout_loss" in r]
    if heldout:
        axes.plot([r["step"] for r in heldout], [r["heldout_loss"] for r in heldout], color="tab:green",
                  linewidth=1.5, marker="s", markersize=4, label="held-out text loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    axes.set_xlabel("step")
    axes.set_ylabel("loss (mean token cross entropy)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if evaluated or heldout:
        axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    plt.close(figure)
    tmp.replace(path)  # never a half-written image at the chosen name
