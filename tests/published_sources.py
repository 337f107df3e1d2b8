"""Writers of tiny published feature sources, built from the documented layouts (not from the project's exporters).

Shared by the import tests, the reproduce-guide tests and the import benchmark.
"""

from __future__ import annotations

import base64
import pickle
from collections import OrderedDict
from pathlib import Path

import lmdb
import numpy as np


def make_rows(n: int, k: int = 5, dim: int = 8, seed: int = 0, prefix: str = "") -> list[dict]:
    """n images of k regions: float32 features [k, dim], boxes [k, 4], labels, cls_prob [k, 6]."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = 300 + i, 400 + 2 * i
        xy = rng.uniform(0, 200, (k, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(1, 90, (k, 2)).astype(np.float32)], axis=1)
        prob = rng.random((k, 6)).astype(np.float32)
        rows.append({
            "id": f"{prefix}{i + 1}", "h": h, "w": w, "boxes": boxes,
            "features": rng.standard_normal((k, dim)).astype(np.float32),
            "objects_id": rng.integers(0, 1600, k).astype(np.int64),
            "objects_conf": rng.random(k).astype(np.float32),
            "attrs_id": rng.integers(0, 400, k).astype(np.int64),
            "attrs_conf": rng.random(k).astype(np.float32),
            "cls_prob": prob / prob.sum(1, keepdims=True),
        })
    return rows


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def write_lmdb(path: Path, entries: list[tuple[str, object]], keys: list[str] | None = None) -> Path:
    """An LMDB folder with a pickled `keys` list and one pickled value per key."""
    env = lmdb.open(str(path), map_size=1 << 32, subdir=True)
    with env.begin(write=True) as txn:
        for key, value in entries:
            txn.put(key.encode(), value if isinstance(value, bytes) else pickle.dumps(value))
        keys = [key for key, _ in entries] if keys is None else keys
        txn.put(b"keys", pickle.dumps([key.encode() for key in keys]))
    env.close()
    return path


def write_vilbert_lmdb(path: Path, rows: list[dict]) -> Path:
    return write_lmdb(path, [(r["id"], {
        "image_id": r["id"], "image_h": r["h"], "image_w": r["w"], "num_boxes": len(r["boxes"]),
        "boxes": r["boxes"], "features": r["features"],
    }) for r in rows])


def write_beta_lmdb(path: Path, rows: list[dict]) -> Path:
    return write_lmdb(path, [(r["id"], OrderedDict([
        ("image_id", r["id"]), ("image_w", str(r["w"])), ("image_h", str(r["h"])),
        ("num_boxes", str(len(r["boxes"]))), ("boxes", b64(r["boxes"])), ("features", b64(r["features"])),
    ])) for r in rows])


def write_volta_lmdb(path: Path, rows: list[dict]) -> Path:
    return write_lmdb(path, [(r["id"], {
        "img_id": r["id"], "img_h": r["h"], "img_w": r["w"], "num_boxes": len(r["boxes"]),
        "objects_id": b64(r["objects_id"]), "objects_conf": b64(r["objects_conf"]),
        "attrs_id": b64(r["attrs_id"]), "attrs_conf": b64(r["attrs_conf"]),
        "boxes": b64(r["boxes"]), "features": r["features"], "cls_prob": r["cls_prob"],
    }) for r in rows])


def butd_line(r: dict) -> str:
    return "\t".join([r["id"], str(r["w"]), str(r["h"]), str(len(r["boxes"])), b64(r["boxes"]), b64(r["features"])])


def write_butd_tsv(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(butd_line(r) + "\n" for r in rows), encoding="ascii")
    return path


def write_lxmert_tsv(path: Path, rows: list[dict]) -> Path:
    lines = ["\t".join([r["id"], str(r["h"]), str(r["w"]), b64(r["objects_id"]), b64(r["objects_conf"]),
                        b64(r["attrs_id"]), b64(r["attrs_conf"]), str(len(r["boxes"])), b64(r["boxes"]),
                        b64(r["features"])]) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="ascii")
    return path


def write_mmf_npy(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for r in rows:
        np.save(path / f"{r['id']}.npy", r["features"])
        info = {"bbox": r["boxes"], "num_boxes": len(r["boxes"]), "image_width": r["w"], "image_height": r["h"],
                "objects": r["objects_id"], "cls_prob": r["cls_prob"]}
        np.save(path / f"{r['id']}_info.npy", info, allow_pickle=True)
    return path


WRITERS = {
    "vilbert-lmdb": (write_vilbert_lmdb, "src.lmdb"),
    "vilbert-beta-lmdb": (write_beta_lmdb, "beta.lmdb"),
    "butd-tsv": (write_butd_tsv, "src.tsv"),
    "lxmert-tsv": (write_lxmert_tsv, "lx.tsv"),
    "volta-lmdb": (write_volta_lmdb, "volta.lmdb"),
    "mmf-npy": (write_mmf_npy, "mmf"),
}

# the optional fields each format carries
CARRIES = {
    "vilbert-lmdb": (), "vilbert-beta-lmdb": (), "butd-tsv": (),
    "lxmert-tsv": ("objects_id", "objects_conf", "attrs_id", "attrs_conf"),
    "volta-lmdb": ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "cls_prob"),
    "mmf-npy": ("objects_id", "cls_prob"),
}
