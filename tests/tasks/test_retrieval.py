"""Retrieval: Karpathy and JSON-lines readers, 4-way training, recall over all captions × images, zero-shot, the
contrastive term."""

import json

import pytest
import torch

from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
from tasks.retrieval import RetrievalConfig, RetrievalDataConfig, RetrievalTask, read_jsonlines, read_karpathy
from tests.fixtures.tiny_task_data import write_karpathy, write_store, write_vocab


@pytest.fixture
def flickr(tmp_path):
    ids = write_karpathy(tmp_path / "flickr" / "dataset_flickr30k.json")
    write_store(tmp_path / "feats.h5", ids)
    write_vocab(tmp_path / "tok")
    return tmp_path


def _task(root, **data):
    data = {"root": str(root / "flickr"), "features": [str(root / "feats.h5")], "tokenizer": str(root / "tok"),
            "max_regions": 5, "eval_batch_size": 2, "max_text_length": 12, **data}
    return RetrievalTask(RetrievalConfig(model=ModelConfig(preset="tiny"), data=RetrievalDataConfig(**data)))


def test_karpathy_and_jsonlines_readers(flickr, tmp_path):
    test = read_karpathy(flickr / "flickr" / "dataset_flickr30k.json", "test")
    assert [im.image_id for im in test] == ["1003", "1004", "1005"] and len(test[0].captions) == 2
    lines = tmp_path / "all_data_final_test_set0_2014.jsonline"
    lines.write_text("\n".join(json.dumps({"img_path": f"{im.image_id}.jpg", "sentences": im.captions})
                               for im in test))
    assert [(im.image_id, im.captions) for im in read_jsonlines(lines)] == [(im.image_id, im.captions) for im in test]
    lines.write_text('{"sentences": ["x"]}\n')
    with pytest.raises(AnnotationError, match="line 1 has no image id"):
        read_jsonlines(lines)


def test_training_samples_are_four_options_with_target_zero(flickr, tmp_path):
    pool = tmp_path / "flickr" / "hard.json"
    pool.write_text(json.dumps({"1000": ["1001"], "1001": ["1000"], "1002": ["1000"]}))
    task = _task(flickr, hard_negatives="hard.json")
    dataset = task.dataset("train")
    assert len(dataset) == 6  # 3 train images × 2 captions
    sample = dataset[0]
    assert sample["input_ids"].shape == (4, 12)
    assert torch.equal(sample["input_ids"][0], sample["input_ids"][2])  # random image keeps the caption
    hard_captions = {tuple(dataset.text.input_ids[k]) for k in (2, 3)}  # image 1001's captions
    assert tuple(sample["input_ids"][3].tolist()) in hard_captions
    model = task.build_model()
    batch = task.collate([dataset[i] for i in range(3)])
    assert batch["region_features"].shape[0] == 12
    out = task.training_step(model, batch)
    assert out.loss_sums["loss"].item() > 0 and 0 <= out.metrics["accuracy"].item() <= 1


def test_evaluation_ranks_every_caption_against_every_image(flickr):
    task = _task(flickr)
    model = task.build_model()
    predictions = task.predict(model, "test")
    metrics = task.score(predictions, "test")
    assert metrics["num_images"] == 3 and metrics["num_captions"] == 6
    images = task.images("test")
    assert predictions["image_ids"] == [im.image_id for im in images]
    scores = torch.tensor(predictions["scores"])
    assert scores.shape == (6, 3)
    # the cached-prefix scores equal a plain forward of the same pair
    regions = task.store().read("1004")
    from tasks.data.regions import collate_visual, visual_input

    visual = collate_visual([visual_input(regions, 5)])
    text = task.tokenizer().encode(images[0].captions[0], 12)
    model.eval()
    with torch.no_grad():
        direct = model(torch.from_numpy(text.input_ids), torch.from_numpy(text.attention_mask),
                       torch.from_numpy(text.token_type_ids), **visual, heads=["pair_logit"]).pair_logit
    assert scores[0, 1].item() == pytest.approx(direct.item(), abs=1e-5)
    for key in ("r1", "r5", "r10", "i2t_r1", "median_rank", "mean_rank"):
        assert key in metrics
    assert metrics["r10"] == 100.0  # only 3 images


def test_zero_shot_from_a_pretraining_checkpoint_uses_alignment_probability(flickr):
    from vilbert import ViLBertConfig, ViLBertForPreTraining

    task = _task(flickr)
    model = ViLBertForPreTraining(ViLBertConfig.from_preset("tiny"))
    images = task.images("test")
    scores = task.score_matrix(model, images, [images[0].captions[0]])
    assert scores.shape == (1, 3) and ((scores > 0) & (scores < 1)).all()


def test_hard_negative_pool_lists_other_images_nearest_first(flickr):
    task = _task(flickr)
    pool = task.hard_negative_pool(task.build_model(), "train", size=5)
    assert set(pool) == {"1000", "1001", "1002"}
    assert all(len(v) == 2 and k not in v for k, v in pool.items())


def test_retrieval_step_adds_the_contrastive_term_over_true_pairs(flickr):
    task = _task(flickr, contrastive_weight=0.5)
    model = task.build_model().eval()  # no dropout: the two steps see the same function
    assert model.config.dual_embedding_size == 256
    dataset = task.dataset("train")
    batch = task.collate([dataset[i] for i in range(3)])
    out = task.training_step(model, batch)
    plain = _task(flickr).training_step(model, batch)
    assert out.metrics["contrastive_loss"].item() > 0
    # per-sample sums over the batch's 3 samples: the contrastive mean counts once per sample
    assert out.loss_sums["loss"].item() == pytest.approx(
        plain.loss_sums["loss"].item() + 3 * 0.5 * out.metrics["contrastive_loss"].item(), rel=1e-5)
