"""Statistics of a client dataset in TFF's EMNIST layout, and a sample image grid."""

from __future__ import annotations

import os
import sqlite3
import string

import numpy as np

from tffpipe.data import emnist_files

CLASSES = string.digits + string.ascii_uppercase + string.ascii_lowercase


def split_statistics(data_dir: str) -> dict[str, dict[str, float]]:
    """Per split: writers, examples, and per-writer example counts (min, median, mean, p90, max)."""
    path = emnist_files.database_path(data_dir)
    emnist_files.check_database(path, only_digits=False)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    stats = {}
    for split in ("all_train", "all_test", "digits_only_train", "digits_only_test"):
        n = np.array(
            [r[0] for r in con.execute("SELECT num_examples FROM client_metadata WHERE split_name=?", (split,))]
        )
        if len(n):
            stats[split] = {
                "writers": len(n),
                "examples": int(n.sum()),
                "min": int(n.min()),
                "median": float(np.median(n)),
                "mean": float(n.mean()),
                "p90": float(np.percentile(n, 90)),
                "max": int(n.max()),
            }
    con.close()
    return stats


def markdown(stats: dict[str, dict[str, float]]) -> str:
    lines = [
        "| split | writers | examples | per writer: min | median | mean | p90 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, s in stats.items():
        lines.append(
            f"| {split} | {s['writers']:,} | {s['examples']:,} | {s['min']} | {s['median']:g} | {s['mean']:.1f} | "
            f"{s['p90']:g} | {s['max']} |"
        )
    return "\n".join(lines)


def _decode(blob: bytes) -> tuple[np.ndarray, int]:
    """Pixels and label from the serialized example, via the protobuf runtime."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example.FromString(blob)
    pixels = np.array(example.features.feature["pixels"].float_list.value, np.float32).reshape(28, 28)
    return pixels, int(example.features.feature["label"].int64_list.value[0])


def write_sample_grid(data_dir: str, png_path: str, writers: int = 8, per_writer: int = 12) -> None:
    """A PNG with one row per writer: their first training examples, labels underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    con = sqlite3.connect(f"file:{emnist_files.database_path(data_dir)}?mode=ro", uri=True)
    ids = [
        r[0]
        for r in con.execute(
            "SELECT client_id FROM client_metadata WHERE split_name='all_train' ORDER BY client_id LIMIT ?", (writers,)
        )
    ]
    fig, axes = plt.subplots(len(ids), per_writer, figsize=(per_writer * 0.7, len(ids) * 0.85), dpi=60)
    for row, cid in enumerate(ids):
        blobs = con.execute(
            "SELECT serialized_example_proto FROM examples WHERE client_id=? AND split_name='all_train' LIMIT ?",
            (cid, per_writer),
        ).fetchall()
        for col in range(per_writer):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(blobs):
                pixels, label = _decode(blobs[col][0])
                ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
                ax.set_title(CLASSES[label], fontsize=7, pad=1)
        axes[row, 0].text(-4, 14, cid, fontsize=6, ha="right", va="center")
    con.close()
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.tight_layout(pad=0.2)
    fig.savefig(png_path)
    plt.close(fig)
