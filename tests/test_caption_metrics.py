"""Caption metrics: the pure-Python path equals pycocoevalcap; known values; Java-free fallback."""
import logging
import math

import pytest

from tasks.metrics import captioning as cm

# tokenised already (lowercase, no punctuation): ties in reference length, repeated n-grams,
# a hypothesis longer than every reference, one shorter, one with nothing in common
GTS = {
    "v1": ["a red square moves left", "a red box is moving to the left", "the square slides left"],
    "v2": ["a blue circle moves up", "a circle goes up", "blue ball rising up up"],
    "v3": ["a green triangle moves right quickly", "a triangle moves right"],
    "v4": ["two shapes bounce", "a yellow square and a red circle bounce around"],
}
RES = {"v1": "a red square moves left", "v2": "a blue circle circle moves up up up and away",
       "v3": "triangle right", "v4": "nothing here matches"}


def test_pure_scorers_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {k: [v] for k, v in RES.items()}
    b, _ = Bleu(4).compute_score(GTS, res, verbose=0)
    assert cm.bleu(GTS, RES) == pytest.approx(b, abs=1e-12)
    assert cm.rouge_l(GTS, RES) == pytest.approx(Rouge().compute_score(GTS, res)[0], abs=1e-12)
    assert cm.cider_d(GTS, RES) == pytest.approx(Cider().compute_score(GTS, res)[0], abs=1e-12)
    assert 0 < cm.cider_d(GTS, RES) < 10


def test_known_values():
    g = {"a": ["a b c d e"], "b": ["x y z w"]}
    # all n-gram precisions 1, hypothesis 4 vs reference 5 words: BP = exp(1 - 5/4)
    assert cm.bleu({"a": g["a"]}, {"a": "a b c d"})[3] == pytest.approx(math.exp(1 - 5 / 4), rel=1e-6)
    assert cm.bleu(g, {"a": "a b c d e", "b": "x y z w"})[3] == pytest.approx(1.0, rel=1e-6)
    # LCS 3 of "a b c" vs "a x b y c": P = 1, R = 3/5, F_1.2 = 2.44·0.6/(0.6 + 1.44)
    assert cm.rouge_l({"a": ["a x b y c"]}, {"a": "a b c"}) == pytest.approx(2.44 * 0.6 / (0.6 + 1.44))
    assert cm.cider_d({"a": ["a b c"]}, {"a": "a b c"}) == 0.0  # one video: every idf is log(1/1) = 0
    assert cm.pure_tokenize("A Man, is COOKING... pasta!") == "a man is cooking pasta"


def test_pure_backend_equals_coco_backend_on_fixed_strings():
    """Both tokenizers agree on plain punctuation, so the full pipelines agree (PTB runs in Java)."""
    gts = {"v1": ["A red square moves left.", "A red box is moving to the left!"],
           "v2": ["A blue circle moves up.", "The circle goes up, slowly."],
           "v3": ["A green triangle moves right", "Triangle: moving right."]}
    res = {"v1": "A red square moves left.", "v2": "a blue circle moves up up", "v3": "Green triangle, right."}
    coco = cm.caption_scores(gts, res, backend="coco", meteor=False)
    pure = cm.caption_scores(gts, res, backend="pure")
    assert coco["backend"] == "coco" and pure["backend"] == "pure" and pure["meteor"] is None
    for k in ("bleu4", "rouge_l", "cider_d"):
        assert pure[k] == pytest.approx(coco[k], abs=1e-12), k
    toks = cm.ptb_tokenize({"x": gts["v3"]})["x"]
    assert toks == [cm.pure_tokenize(c) for c in gts["v3"]]


def test_without_java_falls_back_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        out = cm.caption_scores(GTS, RES)
    assert out["backend"] == "pure" and out["meteor"] is None
    assert "METEOR is skipped" in caplog.text
    with pytest.raises(ValueError, match="backend=coco needs Java"):
        cm.caption_scores(GTS, RES, backend="coco")


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="name different videos"):
        cm.caption_scores(GTS, {"v1": "x"}, backend="pure")
    with pytest.raises(ValueError, match="has no reference captions"):
        cm.caption_scores({"v1": []}, {"v1": "x"}, backend="pure")
    with pytest.raises(ValueError, match="valid backends: auto, coco, pure"):
        cm.caption_scores(GTS, RES, backend="java")


@pytest.mark.slow
def test_meteor_through_pycocoevalcap():  # the METEOR 1.5 jar takes ~18 s to start
    good = cm.caption_scores(GTS, {**RES, "v4": "a yellow square and a red circle bounce"}, backend="coco")
    bad = cm.caption_scores(GTS, RES, backend="coco")
    assert 0 < bad["meteor"] < good["meteor"] <= 1


def test_keyword_accuracy_reads_one_slot_of_the_shapes_captions():
    from tasks.data.captioning import COLOURS, MOTIONS, SHAPES, TEMPLATES

    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in MOTIONS]
    gts = {f"v{i}": [t.format(c=c, s=s, d=d) for t in TEMPLATES] for i, (c, s, d) in enumerate(combos)}
    dirs, shapes = list(MOTIONS), list(SHAPES)

    def hyps(shape_shift, dir_shift):
        return {f"v{i}": f"A {c} {shapes[(shapes.index(s) + shape_shift) % 3]} moves "
                         f"{dirs[(dirs.index(d) + dir_shift) % 4]}." for i, (c, s, d) in enumerate(combos)}

    assert cm.keyword_accuracy(gts, hyps(0, 0), dirs) == 1.0
    assert cm.keyword_accuracy(gts, hyps(1, 0), dirs) == 1.0  # a wrong shape: the direction is still right
    assert cm.keyword_accuracy(gts, hyps(0, 1), dirs) == 0.0
    assert cm.keyword_accuracy(gts, hyps(0, 1), shapes) == 1.0
    # CIDEr-D on the same references: the shape word weighs more than the direction word
    cider = {k: cm.cider_d(gts, hyps(*k)) for k in ((0, 0), (0, 1), (1, 0))}
    assert cider[(0, 0)] - cider[(0, 1)] < cider[(0, 0)] - cider[(1, 0)]


def test_keyword_accuracy_counts_only_videos_with_one_right_word():
    gts = {"a": ["it moves left", "Left, it goes"], "b": ["it moves up", "it goes down"], "c": ["nothing"],
           "d": ["moves right"], "e": ["moves down"]}
    res = {"a": "left then right", "b": "up", "c": "left", "d": "no direction", "e": "Down!"}
    # b (references disagree) and c (they name none) are skipped; a and e right, d names none
    assert cm.keyword_accuracy(gts, res, ["left", "right", "up", "down"]) == pytest.approx(2 / 3)
    assert cm.keyword_accuracy({"c": ["nothing"]}, {"c": "left"}, ["left"]) is None
