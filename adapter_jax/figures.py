"""Writing the scripts' matplotlib figures: PNG files, local or gs://."""

import io

import matplotlib
from etils import epath

matplotlib.use("Agg")  # No display on TPU VMs or CI.
import matplotlib.figure
import matplotlib.pyplot as plt


def save_figure(fig: matplotlib.figure.Figure, path: epath.PathLike) -> epath.Path:
    """Writes `fig` as a PNG to `path` (local or gs://, its folder created) and closes it."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    path.write_bytes(buffer.getvalue())
    plt.close(fig)
    return path
