"""VCR on tiny files in the official format: object tags become names, Q→A, QA→R and Q→AR."""

import pytest

from tasks.errors import AnnotationError
from tasks.finetuning import ModelConfig
from tasks.metrics import accuracy
from tasks.vcr import VCRConfig, VCRDataConfig, VCRRationaleTask, VCRTask, joint_scores, read_vcr
from tests.fixtures.task_steps import data_options, learns
from tests.fixtures.tiny_12in1_data import VCR_WORDS, write_jsonl, write_vcr, write_vocab_with
from tests.fixtures.tiny_task_data import write_store


def test_vcr_tags_become_names_and_q_ar_needs_both(tmp_path):
    write_store(tmp_path / "f.h5", write_vcr(tmp_path / "vcr"))
    write_vocab_with(tmp_path / "tok", VCR_WORDS)
    answers = read_vcr(tmp_path / "vcr" / "val.jsonl", "answer")
    assert answers[0].texts[0] == ("What is Casey doing with dog ?", "Casey is walking it .")
    assert answers[0].texts[3][1] == "Casey and Riley are talking ."  # the second person gets the second name
    rationales = read_vcr(tmp_path / "vcr" / "val.jsonl", "rationale")
    assert rationales[1].texts[0][0] == "What is Casey doing with dog ? Riley runs ."  # with the correct answer
    data = VCRDataConfig(**data_options(tmp_path, "vcr", max_text_length=24))
    qa, qar = (cls(VCRConfig(model=ModelConfig(preset="tiny"), data=data)) for cls in (VCRTask, VCRRationaleTask))
    model = qa.build_model()
    batch = qa.collate([qa.dataset("train")[i] for i in range(3)])
    assert batch["input_ids"].shape == (12, 24) and batch["token_type_ids"][0].max() == 1  # sentence pairs
    assert learns(qa, model, batch, steps=25, lr=1e-2)  # a 4-way softmax over one logit learns slowly
    answer_predictions, rationale_predictions = qa.predict(model, "val"), qar.predict(model, "val")
    metrics = qa.evaluate(model, "val")
    assert metrics["q_a"] == pytest.approx(accuracy({p["annot_id"]: p["choice"] for p in answer_predictions},
                                                    {s.id: s.label for s in answers}))
    joint = joint_scores(answer_predictions, rationale_predictions, answers, rationales)
    assert joint["q_ar"] <= min(joint["q_a"], joint["qa_r"])
    assert qa.evaluate(model, "test") == {"num_predictions": 3.0}
    write_jsonl(tmp_path / "bad.jsonl", [{"annot_id": "x", "objects": ["dog"], "img_fn": "a.jpg",
                                          "question": [[3]], "answer_choices": [["a"]] * 4}])
    with pytest.raises(AnnotationError, match=r"bad.jsonl: line 1 tags object \[3\], but the item has 1 objects"):
        read_vcr(tmp_path / "bad.jsonl", "answer")
