"""The official metrics of the fine-tuning tasks, as plain functions anyone can call on their own predictions.

- VQA: the answer normalisation and the ten-way leave-one-out accuracy of the official evaluation
  (GT-Vision-Lab/VQA, `vqaEval.py`), and the soft target scores of the reference's answer caches.
- Retrieval: recall at K with a stated tie rule, plus median and mean rank.
- Referring expressions: box IoU and the share of expressions whose chosen box overlaps the referred one.
- The other 12-in-1 tasks: GQA exact match, accuracy (SNLI-VE, FOIL, Visual7W, GuessWhat), NLVR2 accuracy and
  consistency, VCR Q→A / QA→R / Q→AR, and grounding accuracy at IoU ≥ 0.5 (Flickr30k Entities).

Aggregate scores (`vqa_score`, `recall_at_k`, `refexp_accuracy`) are percentages, as the papers report them;
per-item scores (`vqa_accuracy`, `box_iou`) are fractions in [0, 1].
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import torch

# ---------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (the official evaluation's processPunctuation + processDigitArticle)
# ---------------------------------------------------------------------------------------------------------------

# Punctuation that is deleted or turned into a space; "." and "'" are handled separately (decimals, contractions).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# A comma between two digits anywhere in the answer ("2,000") makes every punctuation mark vanish without a space.
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period is dropped unless a digit follows it ("1.5" keeps it, "end." and "u.s.a" lose it). The official pattern's
# "(?!<=\d)" is a look-ahead typo for a look-behind; as written it never constrains what precedes the period.
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})

# The official table: apostrophe-less spellings (and a few half-written ones) -> the contracted form.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip


def normalize_punctuation(text: str) -> str:
    """The official punctuation rule.

    Each mark in `PUNCTUATION` is deleted when it touches a space somewhere in the answer ("yes, it is" -> "yes it
    is") or when the answer has a comma between two digits ("2,000" -> "2000"); otherwise it becomes a space
    ("black/white" -> "black white"). Then every period not followed by a digit is deleted ("3.5" stays).
    """
    out = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if strip_all or (mark + " " in text) or (" " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_digits_articles(text: str) -> str:
    """The official word rule: lower-case, number words to digits ("two" -> "2"), drop a/an/the, then restore
    contractions from the table ("dont" -> "don't"); words are re-joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation: whitespace, punctuation, then digits/articles/contractions.

    >>> normalize_answer("The Two dogs!")
    '2 dogs'
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_digits_articles(normalize_punctuation(text))


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------------------


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the humans' answers (ten in VQA v2), in [0, 1].

    The official rule: for each human, take the other humans and score min(#those matching the answer / 3, 1);
    average over the humans (the ten leave-one-out subsets). So an answer given by 3 of 10 humans scores
    (7 · 1 + 3 · 2/3) / 10 = 0.9, and one given by 4 or more scores 1.

    As the official evaluation does, both sides are whitespace-stripped, but the full normalisation
    (`normalize_answer`) is applied to the prediction and the humans only when the humans disagree among
    themselves; when all humans gave the same string the prediction must equal it after stripping.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    humans = [human.replace("\n", " ").replace("\t", " ").strip() for human in human_answers]
    if len(set(humans)) > 1:
        answer = normalize_answer(answer)
        humans = [normalize_answer(human) for human in humans]
    matches = sum(human == answer for human in humans)
    total = 0.0
    for human in humans:
        others_matching = matches - (human == answer)
        total += min(others_matching / 3.0, 1.0)
    return total / len(humans)


def vqa_score(
    predictions: Mapping[int, str] | Iterable[Mapping],
    annotations: Iterable[Mapping],
) -> dict:
    """Official VQA accuracy of a set of predictions, overall and per answer type, as percentages.

    `predictions` is a result file's content (`[{"question_id", "answer"}]`) or a {question_id: answer} map;
    `annotations` are the entries of a `v2_mscoco_*_annotations.json` "annotations" list (question_id, answers
    [{"answer"}], answer_type, question_type). Only the predicted questions are scored; a prediction for a
    question without annotation raises KeyError naming it.
    Returns {"overall", "per_answer_type": {type: %}, "per_question_type": {type: %}, "num_questions"}.
    """
    if not isinstance(predictions, Mapping):
        predictions = {int(entry["question_id"]): str(entry["answer"]) for entry in predictions}
    by_question = {int(entry["question_id"]): entry for entry in annotations}
    per_answer_type: dict[str, list[float]] = defaultdict(list)
    per_question_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for question_id, answer in predictions.items():
        if int(question_id) not in by_question:
            raise KeyError(f"question_id {question_id} has a prediction but no annotation")
        entry = by_question[int(question_id)]
        accuracy = vqa_accuracy(answer, [human["answer"] for human in entry["answers"]])
        scores.append(accuracy)
        per_answer_type[entry.get("answer_type", "unknown")].append(accuracy)
        per_question_type[entry.get("question_type", "unknown")].append(accuracy)

    def percent(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values) if values else 0.0

    return {
        "overall": percent(scores),
        "per_answer_type": {name: percent(values) for name, values in sorted(per_answer_type.items())},
        "per_question_type": {name: percent(values) for name, values in sorted(per_question_type.items())},
        "num_questions": len(scores),
    }


def soft_score(count: int) -> float:
    """Training target of an answer given by `count` of the ten annotators: 0, 0.3, 0.6, 0.9 for 0-3, 1 for ≥ 4.

    This is the reference's `get_score` (bottom-up-attention-vqa), a step approximation of `vqa_accuracy`.
    """
    if count < 0:
        raise ValueError(f"annotator count must be non-negative, got {count}")
    return 1.0 if count >= 4 else 0.3 * count


# ---------------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------------


def retrieval_ranks(scores: torch.Tensor, positives: Sequence[int | Sequence[int]]) -> torch.Tensor:
    """0-based rank of the best positive for each query: the number of *negatives* scoring at least as high.

    Tie rule (pessimistic): a negative whose score equals the positive's counts as ranked above it, so a model
    that gives every candidate the same score gets rank N - #positives, never 0. Other positives never count.
    `scores` is [Q, N] (queries × candidates); `positives[q]` is one candidate index or a list of them.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 2 or scores.shape[0] != len(positives):
        raise ValueError(f"scores must be [Q, N] with Q = len(positives) = {len(positives)}, got {tuple(scores.shape)}")
    is_positive = torch.zeros_like(scores, dtype=torch.bool)
    for query, pos in enumerate(positives):
        index = [pos] if isinstance(pos, int) else list(pos)
        if not index:
            raise ValueError(f"query {query} has no positive candidate")
        is_positive[query, index] = True
    best_positive = scores.masked_fill(~is_positive, float("-inf")).max(dim=1, keepdim=True).values  # [Q, 1]
    return ((scores >= best_positive) & ~is_positive).sum(dim=1)  # [Q]


def recall_at_k(
    scores: torch.Tensor, positives: Sequence[int | Sequence[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall at K (percent of queries whose best positive ranks in the top K), plus median and mean rank.

    `scores` [Q, N]: higher means a better match of query q with candidate n. Ties are pessimistic (see
    `retrieval_ranks`). Median and mean rank are 1-based, as the retrieval literature reports them.
    Returns {"r1": ..., "r5": ..., "r10": ..., "median_rank": ..., "mean_rank": ...}.
    """
    ranks = retrieval_ranks(scores, positives).to(torch.float64)
    result = {f"r{k}": 100.0 * (ranks < k).to(torch.float64).mean().item() for k in ks}
    result["median_rank"] = float(torch.quantile(ranks + 1, 0.5).item())
    result["mean_rank"] = float((ranks + 1).mean().item())
    return result


def mean_recall(metrics: Mapping[str, float]) -> float:
    """`r_mean`: the mean of caption→image R@1, R@5 and R@10 (retrieval's main metric)."""
    return (metrics["r1"] + metrics["r5"] + metrics["r10"]) / 3


def recall_both_ways(text_to_image: torch.Tensor, image_to_text: torch.Tensor,
                     caption_image: Sequence[int]) -> dict[str, float]:
    """Caption→image recall (`recall_at_k` keys), image→caption recall (the same keys with `i2t_`) and `r_mean`.

    `text_to_image` [C, I] and `image_to_text` [I, C] are scores; `caption_image` is each caption's image.
    """
    image_captions = [[c for c, i in enumerate(caption_image) if i == image] for image in range(image_to_text.shape[0])]
    metrics = recall_at_k(text_to_image, caption_image)
    metrics.update({f"i2t_{k}": v for k, v in recall_at_k(image_to_text, image_captions).items()})
    metrics["r_mean"] = mean_recall(metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Boxes and referring expressions
# ---------------------------------------------------------------------------------------------------------------


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] (continuous coordinates: x2 = x + w)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of [..., 4] x1y1x2y2 boxes; inverted or flat boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in `boxes_a` [N, 4] with every box in `boxes_b` [M, 4] -> [N, M], in x1y1x2y2.

    Continuous coordinates (area = w · h, no +1). Boxes that only touch have IoU 0; a zero-area box has IoU 0
    with everything, itself included (no division by zero).
    """
    boxes_a = torch.as_tensor(boxes_a, dtype=torch.float32)
    boxes_b = torch.as_tensor(boxes_b, dtype=torch.float32)
    top_left = torch.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])  # [N, M, 2]
    bottom_right = torch.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # [N, M, 2]
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # [N, M]
    union = box_area(boxes_a)[:, None] + box_area(boxes_b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def paired_box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """IoU of `boxes_a[i]` with `boxes_b[i]`: [N, 4] × [N, 4] -> [N] (same conventions as `box_iou`)."""
    boxes_a = torch.as_tensor(boxes_a, dtype=torch.float32)
    boxes_b = torch.as_tensor(boxes_b, dtype=torch.float32)
    top_left = torch.maximum(boxes_a[..., :2], boxes_b[..., :2])
    bottom_right = torch.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(boxes_a) + box_area(boxes_b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def refexp_accuracy(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, threshold: float = 0.5) -> float:
    """Percent of expressions whose chosen box has IoU ≥ `threshold` with the referred box (both [N, 4] x1y1x2y2).

    The reference counts IoU > 0.5 with "+1" pixel areas ((x2 - x1 + 1) · (y2 - y1 + 1)); we use ≥ and
    continuous areas, the convention of the RefCOCO papers and of the refer toolkit's evaluation. The two differ
    only for boxes whose IoU falls within a pixel's rounding of exactly 0.5.
    """
    ious = paired_box_iou(pred_boxes, gt_boxes)
    if ious.numel() == 0:
        raise ValueError("refexp_accuracy needs at least one expression")
    return 100.0 * (ious >= threshold).to(torch.float64).mean().item()


# ---------------------------------------------------------------------------------------------------------------
# The other 12-in-1 tasks: exact match, accuracy, NLVR2 consistency, VCR, grounding
#
# Each takes the predictions ({item id: predicted label}) and the gold labels of the *whole* split ({item id:
# gold}): an item without a prediction (its image had no features) counts as wrong, and a prediction for an
# unknown id is a KeyError naming it. Results are percentages.
# ---------------------------------------------------------------------------------------------------------------


def _check_known(predictions: Mapping, gold: Mapping, what: str = "item") -> None:
    if not gold:
        raise ValueError("no gold labels to score against (an empty split)")
    unknown = [key for key in predictions if key not in gold]
    if unknown:
        raise KeyError(f"{what} {unknown[0]!r} has a prediction but no gold label")


def accuracy(predictions: Mapping, gold: Mapping) -> float:
    """Percent of gold items whose prediction equals the gold label (SNLI-VE, FOIL, Visual7W, GuessWhat, VCR)."""
    _check_known(predictions, gold)
    return 100.0 * sum(key in predictions and predictions[key] == label for key, label in gold.items()) / len(gold)


def gqa_accuracy(predictions: Mapping[str, str], gold: Mapping[str, str]) -> float:
    """GQA accuracy: percent of questions whose predicted answer is exactly the gold answer string.

    The official evaluation compares the strings as given (GQA answers are already lower-case single words or
    short phrases); only surrounding whitespace is ignored here.
    """
    _check_known(predictions, gold, "question")
    hits = sum(key in predictions and str(predictions[key]).strip() == str(answer).strip()
               for key, answer in gold.items())
    return 100.0 * hits / len(gold)


def nlvr2_sentence_key(identifier: str) -> str:
    """The sentence an NLVR2 example belongs to: its identifier "split-set-pair-sentence" without the pair.

    One sentence is written for a set of image pairs; consistency asks that all of them be judged correctly.
    """
    parts = str(identifier).split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not split-set-pair-sentence")
    return "-".join([*parts[:-2], parts[-1]])


def nlvr2_scores(predictions: Mapping[str, bool], gold: Mapping[str, bool]) -> dict[str, float]:
    """NLVR2 accuracy and consistency (percent of unique sentences whose examples are all correct)."""
    _check_known(predictions, gold, "identifier")
    correct = {key: key in predictions and bool(predictions[key]) == bool(label) for key, label in gold.items()}
    by_sentence: dict[str, bool] = {}
    for key, hit in correct.items():
        sentence = nlvr2_sentence_key(key)
        by_sentence[sentence] = by_sentence.get(sentence, True) and hit
    return {"accuracy": 100.0 * sum(correct.values()) / len(correct),
            "consistency": 100.0 * sum(by_sentence.values()) / len(by_sentence)}


def vcr_scores(answers: Mapping[str, int], rationales: Mapping[str, int],
               gold_answers: Mapping[str, int], gold_rationales: Mapping[str, int]) -> dict[str, float]:
    """VCR Q→A, QA→R and Q→AR accuracy over the annotated items (Q→AR: both the answer and the rationale right).

    QA→R is scored as the benchmark does: the rationale chosen given the *correct* answer.
    """
    _check_known(answers, gold_answers, "annot_id")
    _check_known(rationales, gold_rationales, "annot_id")
    answer_hit = {key: answers.get(key) == label for key, label in gold_answers.items()}
    rationale_hit = {key: rationales.get(key) == label for key, label in gold_rationales.items()}
    both = [answer_hit[key] and rationale_hit.get(key, False) for key in gold_answers]
    return {"q_a": 100.0 * sum(answer_hit.values()) / len(answer_hit),
            "qa_r": 100.0 * sum(rationale_hit.values()) / len(rationale_hit),
            "q_ar": 100.0 * sum(both) / len(both)}


def grounding_accuracy(predicted_boxes: Mapping, gold_boxes: Mapping, threshold: float = 0.5) -> float:
    """Percent of phrases whose predicted box [x1, y1, x2, y2] has IoU ≥ `threshold` with a gold box.

    `gold_boxes[key]` is one box or a list of boxes (a Flickr30k Entities phrase may name several); any of
    them counts. A phrase without prediction counts as wrong.
    """
    _check_known(predicted_boxes, gold_boxes, "phrase")
    hits = 0
    for key, gold in gold_boxes.items():
        if key not in predicted_boxes:
            continue
        gold = torch.as_tensor(gold, dtype=torch.float32).reshape(-1, 4)
        predicted = torch.as_tensor(predicted_boxes[key], dtype=torch.float32).reshape(1, 4)
        hits += bool((box_iou(predicted, gold) >= threshold).any())
    return 100.0 * hits / len(gold_boxes)
