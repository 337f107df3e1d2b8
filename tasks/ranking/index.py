"""An on-disk index of dual-encoder image embeddings: built in resumable chunks, searched exactly or with FAISS.

Layout of an index directory:
- `settings.json`, written first: what the embeddings are made with (checkpoint, feature files, regions per
  image, text settings, chunk size). A resumed build must have the same settings.
- `chunks/chunk-NNNNNN.npy`: the embeddings [≤ chunk size, E] of images NNNNNN × chunk size onwards in the
  feature store's id order, each written to a temporary name and renamed, so a chunk file is whole or absent.
  A build killed at any point (SIGKILL included) resumes at the first missing chunk: no image twice, none lost.
- `embeddings.npy` [N, E] float32 and `ids.json`, then `index.json` (count, width), written last: its presence
  marks a complete index. `faiss.index` (inner product, exact) when built with FAISS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from features.atomic import atomic_path, write_json_atomic
from features.npy import ArrayFileError, load_array
from tasks.data.regions import visual_input
from tasks.errors import ConfigError, DataError
from tasks.ranking.search import embed_images, exact_top_k

SETTINGS_FILE = "settings.json"
INDEX_FILE = "index.json"
CHUNK_DIR = "chunks"


def _write_chunk(path: Path, embeddings: np.ndarray) -> None:
    """One chunk, whole or not at all (temporary file, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, embeddings)


def store_identity(paths: list[str]) -> list[dict[str, Any]]:
    """What identifies each feature file the index reads: its path, size and modification time. A store rewritten
    at the same path (another extraction, a re-import) gets another identity, so a resumed build or a re-ranking
    search refuses to mix its rows with the old ones."""
    identity = []
    for path in paths:
        info = os.stat(path)
        identity.append({"path": str(Path(path).resolve()), "size": info.st_size, "mtime_ns": info.st_mtime_ns})
    return identity


def check_store_identity(index: EmbeddingIndex, paths: list[str]) -> None:
    """Refuse (ConfigError) feature files that are not the ones `index` was built from."""
    recorded = index.settings.get("feature_files")
    if recorded is None:
        return  # an index built before identities were recorded
    try:
        current = store_identity(paths)
    except OSError as error:
        raise ConfigError(f"--index {index.directory}: cannot read its feature file ({error})") from None
    if current != recorded:
        changed = [c["path"] for c, r in zip(current, recorded, strict=False) if c != r] or paths
        raise ConfigError(f"--index {index.directory}: the feature file {changed[0]} changed since the index was "
                          "built; rebuild the index (vilbert index build) before re-ranking with it")


def _chunk_path(directory: Path, number: int) -> Path:
    return directory / CHUNK_DIR / f"chunk-{number:06d}.npy"


def build_index(
    model: nn.Module,
    store,
    out: str | os.PathLike,
    settings: dict[str, Any],
    max_regions: int,
    chunk_size: int = 256,
    use_faiss: bool = False,
    progress: Callable | None = None,
) -> Path:
    """Embed every image of `store` (a features.store.FeatureStore) into the index directory `out`, resuming a
    build that stopped. `settings` (JSON-able) are recorded and must equal those of the build being resumed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; the index is a folder, choose a new path")
    if (out / INDEX_FILE).is_file():
        raise ConfigError(f"{out}: already holds a complete index; choose another --out or remove it")
    if out.is_dir() and any(out.iterdir()) and not (out / SETTINGS_FILE).is_file():
        raise ConfigError(f"--out {out}: is a folder that holds no index build; choose a new or empty folder")
    if max_regions < 2:
        raise ConfigError(f"--max-regions {max_regions}: must be at least 2 (the IMG token and one box); with "
                          "fewer every image would get the same embedding")
    settings = {**settings, "chunk_size": chunk_size, "max_regions": max_regions,
                "feature_files": store_identity(store.paths)}
    (out / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    if (out / SETTINGS_FILE).is_file():
        started = json.loads((out / SETTINGS_FILE).read_text())
        if started != settings:
            changed = sorted(k for k in set(started) | set(settings) if started.get(k) != settings.get(k))
            raise ConfigError(f"{out / SETTINGS_FILE}: the unfinished build used other settings ({', '.join(changed)}); "
                              "rerun it with those, or choose another --out")
    else:
        write_json_atomic(out / SETTINGS_FILE, settings)

    ids = list(store.ids)
    if not ids:
        raise DataError(f"{', '.join(store.paths)}: the feature store holds no images")
    numbers = range((len(ids) + chunk_size - 1) // chunk_size)
    model.eval()
    for number in progress(numbers) if progress else numbers:
        path = _chunk_path(out, number)
        if path.is_file():
            continue  # written whole by an earlier run
        rows = ids[number * chunk_size : (number + 1) * chunk_size]
        visuals = [visual_input(store.read(image_id), max_regions) for image_id in rows]
        _write_chunk(path, embed_images(model, visuals, chunk_size).cpu().numpy().astype(np.float32))

    embeddings = np.concatenate([load_array(_chunk_path(out, n)) for n in numbers])  # [N, E]
    if len(embeddings) != len(ids):
        raise DataError(f"{out / CHUNK_DIR}: chunks hold {len(embeddings)} rows for {len(ids)} images")
    _write_chunk(out / "embeddings.npy", embeddings)
    write_json_atomic(out / "ids.json", ids)
    if use_faiss:
        faiss = _import_faiss()
        flat = faiss.IndexFlatIP(embeddings.shape[1])
        flat.add(embeddings)
        with atomic_path(out / "faiss.index") as tmp:  # not faiss.write_index: it reports a full disk on stderr only
            tmp.write_bytes(faiss.serialize_index(flat).tobytes())
    write_json_atomic(out / INDEX_FILE, {"count": len(ids), "width": int(embeddings.shape[1]), "faiss": use_faiss})
    for leftover in (out / CHUNK_DIR).glob(".*.tmp-*"):  # left by a process killed while writing a chunk
        leftover.unlink()
    return out


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ConfigError("FAISS is not installed: pip install 'vilbert[faiss]' (faiss-cpu), or search with "
                          "the default exact torch backend") from error
    return faiss


@dataclass
class EmbeddingIndex:
    """A complete index: image ids, their unit-length embeddings [N, E], the build settings."""

    directory: Path
    ids: list[str]
    embeddings: torch.Tensor
    settings: dict[str, Any]

    def search(self, queries: torch.Tensor, k: int, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """The k best images of each query [Q, E] by cosine: (scores [Q, k], row indices [Q, k]), best first."""
        queries = queries.detach().float().cpu()
        if backend == "torch":
            return exact_top_k(queries, self.embeddings, k)
        if backend != "faiss":
            raise ConfigError(f"backend must be torch or faiss, got {backend!r}")
        if not (self.directory / "faiss.index").is_file():
            raise ConfigError(f"{self.directory}: built without FAISS (vilbert index build --faiss)")
        faiss = _import_faiss()
        index = faiss.read_index(str(self.directory / "faiss.index"))
        scores, rows = index.search(queries.numpy(), min(k, len(self.ids)))
        return torch.from_numpy(scores), torch.from_numpy(rows).long()


def load_index(directory: str | os.PathLike) -> EmbeddingIndex:
    """Read a complete index directory; an unfinished or foreign one is a ConfigError naming it."""
    directory = Path(directory)
    if not (directory / INDEX_FILE).is_file():
        what = "an unfinished build (rerun vilbert index build to complete it)" if (directory / SETTINGS_FILE).is_file() \
            else "not an index directory"
        raise ConfigError(f"--index {directory}: {what}")
    meta = _read_json(directory / INDEX_FILE, dict)
    ids = _read_json(directory / "ids.json", list)
    settings = _read_json(directory / SETTINGS_FILE, dict)
    try:
        array = load_array(directory / "embeddings.npy")
    except ArrayFileError as error:
        raise DataError(f"--index {directory}: {error}") from None
    if array.dtype.kind != "f" or array.ndim != 2:
        raise DataError(f"--index {directory}: embeddings.npy holds {array.dtype} {list(array.shape)}, expected a "
                        "float [N, E] matrix")
    embeddings = torch.from_numpy(array.astype(np.float32, copy=False))
    count, width = meta.get("count"), meta.get("width")
    if embeddings.shape != (count, width) or len(ids) != count or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{directory}: embeddings {list(embeddings.shape)} and {len(ids)} ids do not match "
                        f"index.json ({count} × {width})")
    for key in ("checkpoint", "features", "max_text_length", "max_regions", "task_token"):
        if key not in settings:
            raise DataError(f"--index {directory}: {SETTINGS_FILE} has no {key!r}; rebuild the index")
    return EmbeddingIndex(directory, ids, embeddings, settings)


def _read_json(path: Path, kind: type) -> Any:
    """A JSON file of the index as `kind`; a missing, truncated or foreign one is one DataError naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--index {path.parent}: {path.name} is missing; rebuild the index") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"--index {path.parent}: {path.name} is not readable JSON ({error})") from None
    if not isinstance(value, kind):
        raise DataError(f"--index {path.parent}: {path.name} holds a {type(value).__name__}, expected a "
                        f"{kind.__name__}")
    return value
