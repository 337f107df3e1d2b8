"""Pretraining: masking statistics and the objective 0/1/2 semantics; end to end through `vilbert pretrain` on a tiny
model and tiny data (seconds on CPU), with and without the contrastive term."""

import json

import numpy as np
import pytest
import torch
import yaml

from features.store import FeatureStore
from tasks import cli
from tasks.data.captions import Caption
from tasks.data.regions import masked_image_mean
from tasks.data.tokenization import load_tokenizer
from tasks.engine.checkpoints import STATE_FILE, list_checkpoints
from tasks.engine.config import load_config
from tasks.pretraining import IGNORE, PretrainConfig, PretrainingDataset, PretrainingTask, collate_pretraining
from tests.fixtures.pretrain_resume import killed_and_resumed
from tests.fixtures.run_logs import records
from tests.fixtures.tiny_pretrain_data import (
    caption_for,
    make_images,
    write_pretraining_data,
    write_store,
    write_vocab,
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_pretraining_data(tmp_path_factory.mktemp("pretrain_data"))


def write_config(tmp_path, paths, **train):
    config = {
        "model": {"preset": "tiny"},
        "data": {
            "tokenizer": str(paths["vocab"]),
            "train_features": str(paths["train_features"]),
            "train_captions": str(paths["train_captions"]),
            "val_features": str(paths["val_features"]),
            "val_captions": str(paths["val_captions"]),
            "max_text_length": 16,
            "max_regions": 9,
            "eval_batch_size": 8,
            "retrieval_chunk": 5,
        },
        "train": {"output_dir": str(tmp_path / "run"), "epochs": 8, "global_batch_size": 16, "num_workers": 0,
                  "log_every": 3, "device": "cpu", **train},
        "optim": {"lr": 3e-3, "warmup": 0.1},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pretrain_command_trains_logs_checkpoints_and_loss_falls(tmp_path, paths, capsys):
    config = write_config(tmp_path, paths)
    assert cli.main(["pretrain", "--config", str(config), "train.eval_every=12"]) == 0
    run = tmp_path / "run"
    train = records(run, "train")
    assert train[-1]["step"] == 24  # 48 pairs / 16 × 8 epochs
    losses = [r["loss"] for r in train]
    assert np.mean(losses[-2:]) < 0.8 * losses[0]  # steps 19-24 against steps 1-3
    assert {"mlm_loss", "region_loss", "alignment_loss", "lr", "samples_per_s", "grad_norm"} <= set(train[0])
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [12, 24]
    for key in ("mlm_accuracy", "region_accuracy", "alignment_accuracy", "retrieval_r1", "retrieval_r5",
                "retrieval_r10"):
        assert 0 <= evals[-1][key] <= 100
    assert evals[-1]["retrieval_r10"] >= evals[-1]["retrieval_r1"]
    last = list_checkpoints(run)[-1]
    assert last.name == "step-00000024"
    assert {"config.json", "model.safetensors", STATE_FILE, "run_config.yaml", "run.json"} <= {
        p.name for p in last.iterdir()}
    # the run record: in the run directory and the checkpoint, the stores' extractors in train, val order
    expected = {"task": "pretrain", "task_token": None, "architecture": "pretraining", "feature_extractor": [
        {"detector": "synthetic", "file": paths[f"{split}_features"].name} for split in ("train", "val")]}
    assert json.loads((run / "run.json").read_text()) == expected == json.loads((last / "run.json").read_text())
    saved = load_config(run / "config.yaml", PretrainConfig)
    assert saved.train.eval_every == 12 and saved.model.preset == "tiny"
    from vilbert import ViLBertForPreTraining

    assert ViLBertForPreTraining.from_pretrained(last).config.hidden_size == 32
    out = capsys.readouterr().out
    assert "run directory" in out and "best mlm_accuracy" in out


@pytest.mark.parametrize("grouping", [[], ["train.group_by_length=true", "data.negatives=image"]],
    ids=["fixed-length", "length-grouped"])
def test_pretraining_resume_reproduces_the_uninterrupted_losses(tmp_path, paths, monkeypatch, grouping):
    overrides = ["train.epochs=2", "train.log_every=1", "train.save_every=3", "train.eval_at_end=false",
                 "train.eval_every=100", *grouping]
    full, resumed = killed_and_resumed(write_config(tmp_path, paths), overrides, tmp_path, monkeypatch)
    a = torch.load(list_checkpoints(full)[-1] / STATE_FILE, weights_only=True)
    b = torch.load(list_checkpoints(resumed)[-1] / STATE_FILE, weights_only=True)
    assert a["state"] == b["state"]


def test_strict_missing_images_fail_before_training(tmp_path, paths, capsys):
    captions = json.loads(paths["train_captions"].read_text())
    captions["not_in_store"] = "a red thing"
    bad = tmp_path / "caption_train.json"
    bad.write_text(json.dumps(captions))
    config = write_config(tmp_path, paths)
    args = ["pretrain", "--config", str(config), f"data.train_captions={bad}", "train.epochs=1"]
    assert cli.main([*args, "--strict"]) == 2
    assert "'not_in_store'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written
    assert cli.main(args) == 0  # without --strict: dropped with a warning


def test_unknown_config_key_is_one_line_error(tmp_path, paths, capsys):
    assert cli.main(["pretrain", "--config", str(write_config(tmp_path, paths)), "train.bach=3"]) == 2
    assert "train.bach" in capsys.readouterr().err


def test_store_without_cls_prob_is_rejected(tmp_path, paths, capsys):
    from tests.fixtures.tiny_pretrain_data import make_images, write_store

    plain = write_store(tmp_path / "plain.h5", make_images(48, seed=0), cls_prob=False)
    assert cli.main(["pretrain", "--config", str(write_config(tmp_path, paths)), f"data.train_features={plain}"]) == 2
    assert "cls_prob" in capsys.readouterr().err


@pytest.mark.parametrize("objective, weight", [(1, 1.0), (2, 0.0)])
def test_objective_2_weights_the_alignment_loss_zero(tmp_path, paths, objective, weight):
    config = load_config(write_config(tmp_path, paths), PretrainConfig, [f"data.objective={objective}"])
    task = PretrainingTask(config)
    model = task.build_model()
    batch = task.collate([task.dataset("train").sample(i, 0) for i in range(8)])
    step = task.training_step(model, batch)
    counts = task.label_counts(batch)
    assert counts["alignment"] == 8
    torch.testing.assert_close(step.loss_sums["alignment"], weight * step.metrics["alignment_loss"] * 8)
    torch.testing.assert_close(step.loss_sums["mlm"], step.metrics["mlm_loss"] * counts["mlm"])
    torch.testing.assert_close(step.loss_sums["region"], step.metrics["region_loss"] * counts["region"])
    assert step.metrics["alignment_loss"] > 0


def test_pretraining_with_contrastive_weight_learns_a_dual_encoder(tmp_path):
    paths = write_pretraining_data(tmp_path / "data")
    config = write_config(tmp_path, paths)
    assert cli.main(["pretrain", "--config", str(config), "data.contrastive_weight=1.0", "train.epochs=20"]) == 0
    run = tmp_path / "run"
    train = records(run, "train")
    contrastive = [r["contrastive_loss"] for r in train]
    assert np.mean(contrastive[-3:]) < 0.85 * np.mean(contrastive[:3])  # from about ln 8 (8 aligned pairs)
    final = records(run, "eval")[-1]
    assert {"retrieval_dual_r1", "retrieval_dual_r5", "retrieval_dual_r10", "retrieval_r1"} <= set(final)
    assert final["retrieval_dual_r1"] > 100 / 12  # above chance among the 12 held-out images
    saved = json.loads((list_checkpoints(run)[-1] / "config.json").read_text())
    assert saved["dual_embedding_size"] == 256


MAX_REGIONS = 12  # IMG + up to 11 boxes; images have 8, so 3 padding slots per sample


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("masking")
    images = make_images(150, seed=3)
    store = FeatureStore(write_store(root / "f.h5", images))
    tokenizer = load_tokenizer(write_vocab(root / "vocab"))
    captions = [Caption(i, caption_for(im["classes"])) for i, im in images.items()]
    return images, store, tokenizer, captions


def dataset(data, objective, negatives="caption"):
    _, store, tokenizer, captions = data
    return PretrainingDataset(captions, store, tokenizer, max_text_length=20, max_regions=MAX_REGIONS,
                              objective=objective, seed=11, negatives=negatives)


def draw(ds, epochs=4):
    return [(i, ds.sample(i, epoch)) for epoch in range(epochs) for i in range(len(ds))]


def test_text_masking_rates_and_labels(data):
    ds = dataset(data, objective=0)
    tok = ds.tokenizer
    candidates = selected = as_mask = as_random = kept = 0
    for index, s in draw(ds):
        caption_index = index if s["alignment_labels"] == 0 else None
        labels, ids = s["mlm_labels"], s["input_ids"]
        if caption_index is not None:
            original = ds.text[index]
        else:  # a swapped caption: recover the original ids from the labels where selected
            original = np.where(labels != IGNORE, labels, ids)
        special = np.isin(original, [tok.cls_id, tok.sep_id, tok.pad_id])
        assert (labels[special] == IGNORE).all()  # [CLS], [SEP], padding never predicted
        chosen = labels != IGNORE
        assert (labels[chosen] == original[chosen]).all()  # labels are the original ids
        assert (ids[~chosen] == original[~chosen]).all()  # unselected tokens untouched
        candidates += int((~special).sum())
        selected += int(chosen.sum())
        as_mask += int((ids[chosen] == tok.mask_id).sum())
        kept += int((ids[chosen] == original[chosen]).sum())
        as_random += int(((ids[chosen] != tok.mask_id) & (ids[chosen] != original[chosen])).sum())
    vocab = tok.vocab_size
    assert selected / candidates == pytest.approx(0.15, abs=0.01)
    assert as_mask / selected == pytest.approx(0.8, abs=0.03)
    assert as_random / selected == pytest.approx(0.1 * (1 - 2 / vocab), abs=0.02)  # a random id may hit the original or [MASK]
    assert kept / selected == pytest.approx(0.1 + 0.1 / vocab, abs=0.02)


def test_region_masking_rates_img_and_padding_never_masked(data):
    images = data[0]
    ds = dataset(data, objective=0)
    real = selected = zeroed = 0
    for index, s in draw(ds):
        image = images[ds.captions[index].image_id]
        batch = collate_pretraining([s])
        labels = batch["region_labels"][0].numpy()
        features = batch["region_features"][0].numpy()
        assert labels[0] == IGNORE and (features[0] != 0).any()  # IMG token: never a target, never zeroed
        assert (labels[9:] == IGNORE).all() and batch["region_mask"][0, 9:].sum() == 0  # padding
        assert set(np.unique(labels)) <= {IGNORE, 1}
        chosen = labels[1:9] == 1
        is_zero = ~features[1:9].any(axis=1)
        assert not (is_zero & ~chosen).any()  # only selected regions are zeroed
        np.testing.assert_array_equal(features[1:9][~is_zero], image["features"][~is_zero].astype(np.float16).astype(np.float32))
        targets = batch["region_targets"][0].numpy()
        np.testing.assert_allclose(targets[1:9], image["cls_prob"], atol=1e-3)  # cls_prob rows, aligned
        masked = features[1:9]
        # the mean in float32, rounded to the stored features' float16 (they travel as stored)
        np.testing.assert_array_equal(features[0], masked_image_mean(masked, image["boxes"], chosen).astype(np.float16))
        real += 8
        selected += int(chosen.sum())
        zeroed += int((chosen & is_zero).sum())
    assert selected / real == pytest.approx(0.15, abs=0.01)
    assert zeroed / selected == pytest.approx(0.9, abs=0.03)


def test_negatives_swap_captions_half_the_time_with_label_one(data):
    ds = dataset(data, objective=0)
    samples = draw(ds)
    labels = np.array([int(s["alignment_labels"]) for _, s in samples])
    assert labels.mean() == pytest.approx(0.5, abs=0.03)
    swapped_differs = []
    for index, s in samples:
        unmasked = np.where(s["mlm_labels"] != IGNORE, s["mlm_labels"], s["input_ids"])
        same = bool((unmasked == ds.text[index]).all())
        if s["alignment_labels"] == 0:
            assert same  # aligned pairs keep their own caption
        else:
            swapped_differs.append(not same)  # another image's caption (rarely the same words)
    assert np.mean(swapped_differs) > 0.8


def test_image_negatives_keep_the_caption_and_swap_the_image(data):
    images = data[0]
    ds = dataset(data, objective=0, negatives="image")
    samples = draw(ds)
    labels = np.array([int(s["alignment_labels"]) for _, s in samples])
    assert labels.mean() == pytest.approx(0.5, abs=0.03)
    for index, s in samples:
        unmasked = np.where(s["mlm_labels"] != IGNORE, s["mlm_labels"], s["input_ids"])
        np.testing.assert_array_equal(unmasked, ds.text[index])  # every sample keeps its own caption
        own = images[ds.captions[index].image_id]["features"].astype(np.float16).astype(np.float32)
        shown = s["visual"].features[1:]
        kept = shown.any(axis=1)  # regions not zeroed by masking
        assert np.array_equal(shown[kept], own[kept]) == (s["alignment_labels"] == 0)


def test_collate_cuts_text_and_regions_to_the_batch_and_keeps_every_token(data):
    ds = dataset(data, objective=1)
    samples = [ds.sample(i, 0) for i in range(6)]
    cut = collate_pretraining(samples)
    full = {key: torch.from_numpy(np.stack([s[key] for s in samples]))
            for key in ("input_ids", "attention_mask", "token_type_ids", "mlm_labels")}  # max_text_length wide
    width = int(full["attention_mask"].sum(1).max())
    assert width < 20 and cut["input_ids"].shape == (6, width)
    for key in ("input_ids", "attention_mask", "token_type_ids", "mlm_labels"):
        assert torch.equal(cut[key], full[key][:, :width])
    assert not full["attention_mask"][:, width:].any()  # only padding is cut
    assert (full["mlm_labels"][:, width:] == IGNORE).all()
    assert cut["labelled_counts"][0] == int((full["mlm_labels"] != IGNORE).sum())
    rows = max(len(s["visual"].features) for s in samples)
    assert cut["region_mask"].shape == cut["region_labels"].shape == (6, rows) <= (6, MAX_REGIONS)
    assert len(ds.text_lengths) == len(ds) and ds.text_lengths[0] == int((ds.text[0] != ds.tokenizer.pad_id).sum())


def test_objective_1_drops_masked_labels_on_mismatched_pairs_only(data):
    ds = dataset(data, objective=1)
    aligned_with_labels = 0
    for _, s in draw(ds, epochs=1):
        if s["alignment_labels"] == 1:
            assert (s["mlm_labels"] == IGNORE).all() and (s["region_labels"] == IGNORE).all()
        else:
            aligned_with_labels += int((s["mlm_labels"] != IGNORE).any())
    assert aligned_with_labels > len(ds) * 0.3


def test_objective_2_has_no_negatives(data):
    ds = dataset(data, objective=2)
    assert all(s["alignment_labels"] == 0 for _, s in draw(ds, epochs=2))


def test_masks_are_a_function_of_seed_epoch_and_index(data):
    ds = dataset(data, objective=1)
    a, b = ds.sample(5, 2), ds.sample(5, 2)
    for key in ("input_ids", "mlm_labels", "region_labels"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["visual"].features, b["visual"].features)
    different = [not np.array_equal(ds.sample(i, 0)["mlm_labels"], ds.sample(i, 1)["mlm_labels"]) for i in range(40)]
    assert sum(different) > 10


def test_collate_shapes_and_dtypes(data):
    ds = dataset(data, objective=1)
    samples = [ds.sample(i, 0) for i in range(4)]
    batch = collate_pretraining(samples)
    text = max(int(s["attention_mask"].sum()) for s in samples)  # the batch's longest caption and image
    regions = max(len(s["visual"].features) for s in samples)
    assert batch["input_ids"].shape == batch["mlm_labels"].shape == (4, text)
    assert batch["region_features"].shape == (4, regions, 16)
    assert batch["region_locations"].shape == (4, regions, 5)
    assert batch["region_targets"].shape == (4, regions, 7)
    assert batch["region_features"].dtype == batch["region_targets"].dtype == torch.float16  # as stored
    assert batch["alignment_labels"].shape == (4,)
    counts = batch.pop("labelled_counts")
    assert counts == (int((batch["mlm_labels"] != IGNORE).sum()), int((batch["region_labels"] == 1).sum()))
    assert all(t.dtype == torch.int64 for k, t in batch.items() if k not in ("region_features", "region_locations",
                                                                              "region_targets"))
