"""Dual-encoder search: the on-disk index (exact, resumable), co-attention re-ranking, the retrieval modes."""

import json
import multiprocessing
import os
import shutil
import signal

import numpy as np
import pytest
import torch

from features.atomic import atomic_path, temporary_path
from tasks import cli
from tasks.finetuning import ModelConfig
from tasks.ranking.index import load_index
from tasks.ranking.search import rank_both_ways, rerank
from tasks.retrieval import RetrievalConfig, RetrievalDataConfig, RetrievalTask
from tests.fixtures.cli_check import assert_refused, run_cli
from tests.fixtures.small_disk import assert_refused_full, fill
from tests.fixtures.tiny_task_data import write_karpathy, write_store, write_vocab
from vilbert import ViLBertConfig, ViLBertForVLTasks


@pytest.fixture
def data(tmp_path):
    ids = write_karpathy(tmp_path / "flickr" / "dataset_flickr30k.json", num_images=10, test_images=5)
    write_store(tmp_path / "feats.h5", ids)
    write_vocab(tmp_path / "tok")
    torch.manual_seed(0)
    model = ViLBertForVLTasks(ViLBertConfig.from_preset("tiny", dual_embedding_size=8,
                                                            initializer_range=0.2))  # scores far apart
    model.save_pretrained(tmp_path / "ckpt")
    shutil.copy(tmp_path / "tok" / "vocab.txt", tmp_path / "ckpt" / "vocab.txt")  # the checkpoint's tokenizer
    return tmp_path


def _task(root):
    data = {"root": str(root / "flickr"), "features": [str(root / "feats.h5")], "tokenizer": str(root / "tok"),
            "max_regions": 5, "eval_batch_size": 3, "max_text_length": 12}
    config = RetrievalConfig(model=ModelConfig(preset="tiny", init=str(root / "ckpt")),
                             data=RetrievalDataConfig(**data))
    return RetrievalTask(config)


def _build(root, out, *extra):
    return cli.main(["index", "build", "--checkpoint", str(root / "ckpt"), "--features", str(root / "feats.h5"),
                     "--out", str(out), "--batch-size", "3", "--device", "cpu", *extra])


def test_index_search_returns_exactly_the_brute_force_top_k(data):
    assert _build(data, data / "index", "--faiss") == 0
    index = load_index(data / "index")
    assert len(index.ids) == 10 and index.embeddings.shape == (10, 8)
    torch.testing.assert_close(index.embeddings.norm(dim=1), torch.ones(10))
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    brute = queries @ index.embeddings.T  # [7, 10]
    for backend in ("torch", "faiss"):
        scores, rows = index.search(queries, 4, backend)
        assert torch.equal(rows, brute.topk(4, dim=1).indices)
        torch.testing.assert_close(scores, brute.topk(4, dim=1).values, atol=1e-6, rtol=0)


def _killed_build(root, out):
    """Child process: build the index, SIGKILL itself half way through writing the third chunk."""
    import tasks.ranking.index as embedding_index

    real, calls = embedding_index._write_chunk, []

    def write_then_die(path, embeddings):
        calls.append(path)
        if len(calls) == 3:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(b"\x93NUMPY half")  # a torn write
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, embeddings)

    embedding_index._write_chunk = write_then_die
    _build(root, out)


def test_index_build_resumes_after_sigkill_without_duplicates(data):
    child = multiprocessing.get_context("fork").Process(target=_killed_build, args=(data, data / "index"))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert sorted(p.name for p in (data / "index" / "chunks").iterdir()) == [
        temporary_path(data / "index" / "chunks" / "chunk-000002.npy").name.replace(str(os.getpid()), str(child.pid)),
        "chunk-000000.npy", "chunk-000001.npy"]
    with pytest.raises(Exception, match="unfinished build"):
        load_index(data / "index")
    assert _build(data, data / "index") == 0  # resumes at chunk 2
    assert _build(data, data / "clean") == 0
    resumed, clean = load_index(data / "index"), load_index(data / "clean")
    assert resumed.ids == clean.ids and len(set(resumed.ids)) == 10
    assert torch.equal(resumed.embeddings, clean.embeddings)
    assert sorted(p.name for p in (data / "index" / "chunks").iterdir()) == [f"chunk-{n:06d}.npy" for n in range(4)]


@pytest.mark.parametrize("pages, failing", [(3, "chunks/chunk-000002.npy"), (7, "faiss.index")])
def test_index_build_onto_a_full_disk_is_one_line_and_resumes_when_there_is_room(data, small_disk, pages, failing):
    """Room (a page a file) for the settings and two chunks, or for all four chunks: the next file fails in one
    line (no traceback, no temporary), the chunks written stay, the index is not complete, and once the disk has
    room the same command finishes the index exactly as a clean build."""
    argv = ["index", "build", "--checkpoint", data / "ckpt", "--features", data / "feats.h5", "--out",
            small_disk / "index", "--batch-size", "3", "--device", "cpu", "--faiss"]
    filler = fill(small_disk, leave_pages=pages)
    line = assert_refused_full(argv, small_disk)
    assert line.endswith(f"writing {small_disk / 'index' / failing}"), line
    chunks = small_disk / "index" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == [f"chunk-{n:06d}.npy" for n in range(min(4, pages - 1))]
    assert "index.json" not in [p.name for p in (small_disk / "index").iterdir()]  # not taken for a complete index
    filler.unlink()
    code, _, stderr = run_cli(argv)
    assert code == 0, stderr
    assert _build(data, data / "clean", "--faiss") == 0
    resumed, clean = load_index(small_disk / "index"), load_index(data / "clean")
    assert resumed.ids == clean.ids and torch.equal(resumed.embeddings, clean.embeddings)


def test_resuming_with_other_settings_is_refused(data, capsys):
    (data / "index" / "chunks").mkdir(parents=True)
    (data / "index" / "settings.json").write_text(json.dumps({"checkpoint": "elsewhere"}))
    assert _build(data, data / "index") == 2
    assert "other settings" in capsys.readouterr().err


def test_rerank_of_all_candidates_is_the_coattention_ranking(data):
    task = _task(data)
    model = task.build_model().eval()
    from tasks.data.regions import visual_input

    images = task.images("test")
    captions = [c for im in images for c in im.captions]
    visuals = [visual_input(task.store().read(im.image_id), 5) for im in images]
    tokenizer = task.tokenizer()
    co = rank_both_ways(model, tokenizer, captions, visuals, 12, "coattention")
    full = rank_both_ways(model, tokenizer, captions, visuals, 12, "dual+rerank", rerank_k=len(captions))
    dual = rank_both_ways(model, tokenizer, captions, visuals, 12, "dual")
    for direction in ("text_to_image", "image_to_text"):
        # the co-attention scores read in the re-ranked order fall (to float noise: batched vs single forwards)
        order = torch.argsort(full[direction], dim=1, descending=True, stable=True)
        along = co[direction].gather(1, order)
        assert (along[:, 1:] <= along[:, :-1] + 1e-5).all()
        assert torch.equal(order[:, 0], co[direction].argmax(dim=1))
    # K = 1: the dual encoder's best stays first whatever its co-attention score; the rest keep the dual order
    one = rerank(dual["text_to_image"], 1, lambda q, c: torch.tensor([-50.0]))
    assert torch.equal(one.argsort(dim=1, descending=True, stable=True),
                       dual["text_to_image"].argsort(dim=1, descending=True, stable=True))


def test_evaluate_command_reports_recall_and_speed_in_each_mode(data):
    for mode in ("coattention", "dual", "dual+rerank"):
        out = data / f"eval-{mode}"
        assert cli.main(["evaluate", "--task", "retrieval", "--checkpoint", str(data / "ckpt"), "--split", "test",
                         "--config", str(_write_yaml(data)), "--mode", mode, "--rerank-k", "2",
                         "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["mode"] == mode and metrics["num_captions"] == 10
        assert metrics["t2i_queries_per_s"] > 0 and metrics["i2t_queries_per_s"] > 0
        assert {"r1", "r5", "r10", "i2t_r1", "i2t_r5", "i2t_r10"} <= set(metrics)


def _write_yaml(root):
    import yaml

    path = root / "retrieval.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "data": {"root": str(root / "flickr"), "features": [str(root / "feats.h5")], "tokenizer": str(root / "tok"),
                 "max_regions": 5, "eval_batch_size": 3, "max_text_length": 12},
    }))
    return path


def test_search_command_finds_images_and_captions_and_reranks(data, capsys):
    assert _build(data, data / "index") == 0
    capsys.readouterr()
    assert cli.main(["search", "--index", str(data / "index"), "--text", "a red ball", "--top", "3",
                     "--rerank", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 3 and all("coattention_score" in r for r in results)
    assert [r["coattention_score"] for r in results] == sorted((r["coattention_score"] for r in results),
                                                               reverse=True)
    captions = data / "captions.txt"
    captions.write_text("a red ball\na white cat\ntwo dogs\n")
    assert cli.main(["search", "--index", str(data / "index"), "--image-id", "1000", "--captions", str(captions),
                     "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["results"]
    assert sorted(r["caption"] for r in found) == ["a red ball", "a white cat", "two dogs"]
    scores = [r["dual_score"] for r in found]
    assert scores == sorted(scores, reverse=True)
    assert cli.main(["search", "--index", str(data / "nowhere"), "--text", "x"]) == 2
    assert np.isfinite(scores).all()


def test_index_build_with_faiss_prints_no_import_chatter(data):
    code, _, stderr = run_cli(["index", "build", "--checkpoint", str(data / "ckpt"), "--features",
                               str(data / "feats.h5"), "--out", str(data / "index"), "--batch-size", "3",
                               "--device", "cpu", "--faiss"], subprocess=True)
    assert code == 0, stderr
    assert "ModuleNotFoundError" not in stderr and "faiss.loader" not in stderr and "not sharded" not in stderr
    assert "Loading weights" not in stderr  # transformers' bar for every checkpoint read


def test_resuming_a_build_after_the_store_changed_is_refused(data, capsys):
    assert _build(data, data / "index") == 0
    settings = json.loads((data / "index" / "settings.json").read_text())
    shutil.rmtree(data / "index")
    (data / "index" / "chunks").mkdir(parents=True)  # a build killed after its settings, then...
    (data / "index" / "settings.json").write_text(json.dumps(settings))
    write_store(data / "feats.h5", [str(1000 + i) for i in range(10)], seed=5)  # ...the store is rewritten
    capsys.readouterr()
    assert _build(data, data / "index") == 2
    assert "feature_files" in capsys.readouterr().err


def test_rerank_after_the_store_changed_is_refused(data, capsys):
    assert _build(data, data / "index") == 0
    write_store(data / "feats.h5", [str(1000 + i) for i in range(10)], seed=5)
    capsys.readouterr()
    assert cli.main(["search", "--index", str(data / "index"), "--text", "a dog", "--rerank", "3",
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "changed since the index was built" in err and "feats.h5" in err


@pytest.mark.parametrize("regions", ["0", "1", "-3"])
def test_max_regions_below_two_is_refused(data, regions, capsys):
    assert _build(data, data / "index", "--max-regions", regions) == 2
    assert "--max-regions" in capsys.readouterr().err
    assert not (data / "index" / "settings.json").exists()


@pytest.mark.parametrize("damage", ["truncated index.json", "no ids.json", "bad settings.json",
                                    "object embeddings"])
def test_search_on_a_damaged_index_is_one_line(data, damage):
    assert _build(data, data / "index") == 0
    index = data / "index"
    if damage == "truncated index.json":
        (index / "index.json").write_text('{"count": 1')
    elif damage == "no ids.json":
        (index / "ids.json").unlink()
    elif damage == "bad settings.json":
        (index / "settings.json").write_text("[]")
    else:
        np.save(index / "embeddings.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert_refused(["search", "--index", str(index), "--text", "a dog", "--device", "cpu"], names=[str(index)])


def test_index_build_into_a_file_or_a_foreign_folder_is_refused(data):
    (data / "notes.txt").write_text("mine")
    assert_refused(["index", "build", "--checkpoint", str(data / "ckpt"), "--features", str(data / "feats.h5"),
                    "--out", str(data / "notes.txt"), "--device", "cpu"], names=["notes.txt", "is a file"])
    assert (data / "notes.txt").read_text() == "mine"
    assert_refused(["index", "build", "--checkpoint", str(data / "ckpt"), "--features", str(data / "feats.h5"),
                    "--out", str(data / "flickr"), "--device", "cpu"], names=["flickr", "holds no index build"])


def test_every_mode_counts_images_without_features_in_the_denominator(data):
    split = json.loads((data / "flickr" / "dataset_flickr30k.json").read_text())
    test_ids = [im["filename"].split(".")[0] for im in split["images"] if im["split"] == "test"]
    write_store(data / "feats.h5", [i for i in [str(1000 + n) for n in range(10)] if i != test_ids[0]])
    for mode in ("coattention", "dual"):
        out = data / f"eval-{mode}"
        argv = ["evaluate", "--task", "retrieval", "--checkpoint", str(data / "ckpt"), "--split", "test",
                "--config", str(_write_yaml(data)), "--out", str(out)]
        assert cli.main(argv + (["--mode", mode] if mode != "coattention" else [])) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["num_images"] == 5 and metrics["num_without_features"] == 1, (mode, metrics)
        assert metrics["r10"] <= 80.0 and metrics["i2t_r10"] <= 80.0  # the unranked image's captions are misses
