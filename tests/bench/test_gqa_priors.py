"""bench/gqa_priors.py: the blind guesses' accuracy on hand-made GQA files."""

import json

from bench.gqa_priors import main, template


def write(path, questions):
    path.write_text(json.dumps({str(i): {"imageId": "1", "question": q, "answer": a, "types": {"detailed": t}}
                                for i, (q, a, t) in enumerate(questions)}))


def test_each_guess_answers_from_its_key_and_the_template_hides_the_attribute_words(tmp_path, capsys):
    assert template("are the large circles and the red square the same color?") == "are the S K and the C K the same color?"
    write(tmp_path / "train_balanced_questions.json", [
        ("is the red circle small?", "no", "verify"), ("is the blue circle small?", "no", "verify"),
        ("is the red square small?", "yes", "verify"), ("what color is the square?", "red", "query"),
        ("what color is the circle?", "blue", "query"), ("what color is the large circle?", "blue", "query")])
    write(tmp_path / "testdev_balanced_questions.json", [
        ("is the red square small?", "yes", "verify"), ("is the blue circle small?", "yes", "verify"),
        ("what color is the circle?", "blue", "query"), ("what color is the triangle?", "green", "query")])
    assert main(["--gqa", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(4 questions; priors from 6 train questions)" in lines[0]
    # majority "no" (tied with "blue", seen first): 0 of 4; per type (verify: no, query: blue): 1; per template ("is the
    # C K small?" -> no, "what color is the K?" -> red, tied and seen first): 0; per exact question: yes, no, blue and
    # the unseen triangle's "no": 2
    assert [line.split()[-2] for line in lines[1:5]] == ["0.0", "25.0", "0.0", "50.0"]
    assert lines[6].split()[:2] == ["query", "50.0"] and lines[7].split()[:2] == ["verify", "100.0"]
