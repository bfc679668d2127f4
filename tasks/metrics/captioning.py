"""Caption metrics: BLEU-4, METEOR, ROUGE-L, CIDEr-D as the COCO caption evaluation computes them.

Two backends (``shared/reference/clip_fewshot_captioning.md`` §2.2):

* ``coco``: pycocoevalcap 1.2 (``salaniz/pycocoevalcap``): Stanford PTB tokenizer (Java) with
  punctuation dropped, ``Bleu(4)``, ``Meteor`` (METEOR 1.5 jar, Java; ~18 s to start),
  ``Rouge`` (ROUGE-L, β = 1.2), ``Cider`` (which is CIDEr-D: σ = 6 length penalty, clipped tf-idf,
  ×10). Numbers comparable with papers.
* ``pure``: no Java. BLEU, ROUGE-L and CIDEr-D re-implemented here with the same semantics
  (tested equal to pycocoevalcap's scorers on the same tokens) after a Python tokenizer
  (lowercase, punctuation removed, whitespace split), so scores can shift slightly against the PTB
  tokenizer (contractions, hyphens); METEOR is not computed (``None``).

``auto`` picks ``coco`` when ``java`` is on PATH and pycocoevalcap imports, else ``pure`` and says
so in the log. All scores are in [0, 1] except CIDEr-D (about 0–10); papers print them ×100.

Input: ``gts = {video_id: [reference, ...]}``, ``res = {video_id: hypothesis}`` (one each).

:func:`keyword_accuracy` is not a published metric: on captions built from a few slots (the embedded
moving shapes: colour, shape, direction) it reads one slot, e.g. whether the direction word is right.
CIDEr-D cannot: with one reference set per slot combination, its idf weights the full-caption 3- and
4-grams (each in one video's references) far above a single word, so it mostly counts exactly right
captions.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import shutil
from collections import Counter
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

BACKENDS = ("auto", "coco", "pure")
# pycocoevalcap tokenizer/ptbtokenizer.py PUNCTUATIONS (tokens dropped after PTB tokenisation)
_PUNCT = "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"
_STRIP = re.compile(r"[^\w\s]|_")


def java_available() -> bool:
    return shutil.which("java") is not None


def pure_tokenize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace (the Java-free stand-in for the PTB tokenizer)."""
    return " ".join(_STRIP.sub(" ", text.lower()).split())


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


# ---------------------------------------------------------------------------------------- BLEU
def bleu(gts: Mapping, res: Mapping, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n, pycocoevalcap ``BleuScorer`` with option='closest' (reference length
    closest to each hypothesis, the shorter on ties; tiny/small smoothing constants as there)."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    testlen = reflen = 0
    for key in gts:
        hyp = res[key].split()
        refs = [r.split() for r in gts[key]]
        maxcounts: Counter = Counter()
        for r in refs:
            for g, c in _ngrams(r, n).items():
                maxcounts[g] = max(maxcounts[g], c)
        counts = _ngrams(hyp, n)
        for g, c in counts.items():
            correct[len(g) - 1] += min(maxcounts.get(g, 0), c)
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        testlen += len(hyp)
        reflen += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    out, score = [], 1.0
    for k in range(n):
        score *= (correct[k] + tiny) / (guess[k] + small)
        out.append(score ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


# ---------------------------------------------------------------------------------------- ROUGE-L
def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(gts: Mapping, res: Mapping, beta: float = 1.2) -> float:
    """Mean over videos of F_β(max_r P_r, max_r R_r) with P, R from the LCS (pycocoevalcap ``Rouge``;
    tokens split on single spaces as there)."""
    scores = []
    for key in gts:
        cand = res[key].split(" ")
        lcs = [(_lcs(r.split(" "), cand), len(r.split(" "))) for r in gts[key]]
        p = max(l / len(cand) for l, _ in lcs)
        r = max(l / n for l, n in lcs)
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------- CIDEr-D
def cider_d(gts: Mapping, res: Mapping, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al., CVPR 2015) as pycocoevalcap's ``CiderScorer``.

    df(g) = number of videos whose references contain g; tf-idf = count · (log N − log max(1, df));
    per n and reference: Σ_g min(h_g, r_g) r_g / (‖h‖‖r‖) · exp(−(ℓ_h − ℓ_r)²/(2σ²)) with ℓ the
    number of bigrams; mean over n, sum over references / #refs, ×10; mean over videos.
    """
    keys = list(gts)
    refs = {k: [_ngrams(r.split(), n) for r in gts[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        df.update(set(g for r in refs[k] for g in r))
    log_n = math.log(float(len(keys)))

    def vec(counts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            i = len(g) - 1
            v[i][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[i] += v[i][g] ** 2
            if i == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    total = 0.0
    for k in keys:
        vh, nh, lh = vec(_ngrams(res[k].split(), n))
        score = [0.0] * n
        for r in refs[k]:
            vr, nr, lr = vec(r)
            pen = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for i in range(n):
                val = sum(min(w, vr[i].get(g, 0.0)) * vr[i].get(g, 0.0) for g, w in vh[i].items())
                if nh[i] != 0 and nr[i] != 0:
                    val /= nh[i] * nr[i]
                score[i] += val * pen
        total += sum(score) / n / len(refs[k]) * 10.0
    return total / len(keys)


# ---------------------------------------------------------------------------------------- one slot
def keyword_accuracy(gts: Mapping, res: Mapping, words: Sequence[str]) -> float | None:
    """Fraction of videos whose hypothesis names the word of ``words`` that its references name.

    A caption's word is the first token (pure tokenizer) that is one of ``words`` (``None`` if it names
    none); a video counts only when every reference names the same word (others are skipped: there is
    no single right answer). ``None`` when no video counts.
    """
    vocab = {pure_tokenize(w) for w in words}

    def word(text: str) -> str | None:
        return next((t for t in pure_tokenize(text).split() if t in vocab), None)

    hits = []
    for key, refs in gts.items():
        named = {word(r) for r in refs}
        if len(named) == 1 and None not in named:
            hits.append(word(res[key]) == named.pop())
    return sum(hits) / len(hits) if hits else None


# ---------------------------------------------------------------------------------------- entry point
def _check(gts: Mapping, res: Mapping) -> None:
    if not gts:
        raise ValueError("caption metrics need at least one video with references")
    if set(gts) != set(res):
        missing, extra = sorted(set(gts) - set(res))[:3], sorted(set(res) - set(gts))[:3]
        raise ValueError(f"references and hypotheses name different videos (missing {missing}, extra {extra})")
    empty = [k for k, v in gts.items() if not v]
    if empty:
        raise ValueError(f"video {empty[0]!r} has no reference captions")


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown caption metric backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    coco_ok = java_available()
    if coco_ok:
        try:
            import pycocoevalcap  # noqa: F401
        except ImportError:
            coco_ok = False
    if backend == "coco" and not coco_ok:
        raise ValueError("backend=coco needs Java on PATH and pycocoevalcap (pip install -e '.[caption]'); "
                         "use backend=pure (no METEOR)")
    if backend == "auto":
        backend = "coco" if coco_ok else "pure"
        if backend == "pure":
            log.warning("Java or pycocoevalcap not found: caption metrics use the pure-Python BLEU/ROUGE-L/CIDEr-D "
                        "with a simple tokenizer; METEOR is skipped")
    return backend


def caption_scores(gts: Mapping, res: Mapping, backend: str = "auto", meteor: bool = True) -> dict:
    """``{"bleu4", "meteor", "rouge_l", "cider_d", "backend"}`` (METEOR ``None`` when not computed)."""
    _check(gts, res)
    backend = resolve_backend(backend)
    gts = {str(k): list(v) for k, v in gts.items()}
    res = {str(k): v for k, v in res.items()}
    if backend == "pure":
        g = {k: [pure_tokenize(r) for r in v] for k, v in gts.items()}
        h = {k: pure_tokenize(res[k]) for k in g}
        return {"bleu4": bleu(g, h)[3], "meteor": None, "rouge_l": rouge_l(g, h), "cider_d": cider_d(g, h),
                "backend": "pure"}
    return _coco_scores(gts, res, meteor)


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTB tokenizer (Java): ``{id: [caption, ...]}`` -> tokenised, punctuation dropped."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def _coco_scores(gts: dict, res: dict, meteor: bool) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    g = ptb_tokenize(gts)
    h = ptb_tokenize({k: [v] for k, v in res.items()})
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
        b, _ = Bleu(4).compute_score(g, h)
    out = {"bleu4": float(b[3]), "meteor": None, "rouge_l": float(Rouge().compute_score(g, h)[0]),
           "cider_d": float(Cider().compute_score(g, h)[0]), "backend": "coco"}
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()  # its __del__ stops the jar
        # an empty hypothesis would break METEOR's line protocol: score it as "." (matches nothing)
        out["meteor"] = float(m.compute_score(g, {k: [v[0] or "."] for k, v in h.items()})[0])
        del m
    return out
