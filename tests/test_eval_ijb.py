"""IJB-B/C: similarity transform, template aggregation, 1:1 and 1:N metrics, and an end-to-end run.

The end-to-end run is on an IJB-C-layout fixture; each part is checked against an independent computation
written here.
"""

import math

import cv2
import numpy as np
import pytest
from skimage.transform import SimilarityTransform
from sklearn.metrics import auc, roc_curve

from mixbct_jax.evaluation import ijb


class ProjectionEmbedder:
    """A fixed random linear projection of the pixels: similar images get similar embeddings."""

    def __init__(self, image_size: int = 112, dim: int = 16, seed: int = 0):
        self.image_size = image_size
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((image_size * image_size * 3, dim)).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1) @ self.w


# ------------------------------------------------------------------------------------------------ alignment


@pytest.mark.parametrize("seed", range(5))
def test_similarity_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 200, (5, 2))
    dst = ijb.REFERENCE_LANDMARKS + rng.normal(0, 3, (5, 2))
    if seed == 4:
        src[:, 0] *= -1  # a mirrored configuration: the best orthogonal map is a reflection, which is excluded
    ref = SimilarityTransform.from_estimate(src, dst)
    assert ref
    np.testing.assert_allclose(ijb.estimate_similarity(src, dst), ref.params, rtol=1e-9, atol=1e-9)


def test_similarity_recovers_exact_transform():
    angle, scale, t = 0.3, 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.random.default_rng(0).uniform(0, 50, (5, 2))
    m = ijb.estimate_similarity(src, src @ rot.T + t)
    np.testing.assert_allclose(m[:2, :2], rot, atol=1e-12)
    np.testing.assert_allclose(m[:2, 2], t, atol=1e-12)
    with pytest.raises(ValueError, match="degenerate"):
        ijb.estimate_similarity(np.ones((5, 2)), src)


def test_align_face_puts_landmarks_on_template():
    # A black image with white dots at the landmarks: after alignment the dots sit on the template.
    rng = np.random.default_rng(1)
    lmk = ijb.REFERENCE_LANDMARKS * 1.6 + np.array([30.0, 20.0]) + rng.normal(0, 0.5, (5, 2))
    img = np.zeros((260, 240, 3), np.uint8)
    for x, y in lmk:
        cv2.circle(img, (int(round(x)), int(round(y))), 4, (255, 255, 255), -1)
    out = ijb.align_face(img, lmk)
    assert out.shape == (112, 112, 3)
    for x, y in ijb.REFERENCE_LANDMARKS:
        assert out[int(round(y)), int(round(x))].min() > 200


# ------------------------------------------------------------------------------------------------ templates


def test_template_features_hand_computed():
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -5.0], [4.0, 4.0]])
    templates = np.array([7, 7, 7, 3, 9])
    medias = np.array([1, 1, 2, 5, 6])
    uniq, out = ijb.template_features(feats, templates, medias)
    np.testing.assert_array_equal(uniq, [3, 7, 9])
    # Template 7: media 1 mean (2, 0) + media 2 (0, 2) = (2, 2) -> (1, 1)/sqrt(2).
    np.testing.assert_allclose(out, [[0, -1], [2**-0.5, 2**-0.5], [2**-0.5, 2**-0.5]], atol=1e-7)
    uniq, out = ijb.template_features(feats, templates, medias, choose_templates=np.array([9, 7, 9, 11]))
    np.testing.assert_array_equal(uniq, [7, 9, 11])
    np.testing.assert_allclose(out[2], [0, 0])  # no image: zero row, as the reference


# ------------------------------------------------------------------------------------------------ 1:1


def test_verification_metrics_reference_rule():
    rng = np.random.default_rng(2)
    labels = (rng.random(20000) < 0.1).astype(int)
    scores = rng.normal(0, 1, labels.size) + 2.5 * labels
    res = ijb.verification_metrics(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert res["auc"] == pytest.approx(auc(fpr, tpr))
    for far in ijb.FARS_1TO1:
        # Nearest FPR; among equally near points, the largest TPR.
        d = np.abs(fpr - far)
        expect = tpr[d == d.min()].max()
        assert res["tar_at_far"][f"{far:.0e}"] == pytest.approx(expect)
    assert res["tar_at_far"]["1e-01"] > 0.5


@pytest.mark.parametrize("block_rows", [7, None])  # several tiles; the whole grid in one tile
@pytest.mark.parametrize("method", ["gather", "blocks", "auto"])
def test_pair_scores_chunked(method, block_rows):
    rng = np.random.default_rng(3)
    f1, f2 = rng.standard_normal((50, 8)), rng.standard_normal((40, 8))
    r1, r2 = rng.integers(0, 50, 1000), rng.integers(0, 40, 1000)
    out = ijb.pair_scores(f1, f2, r1, r2, method=method, chunk_size=77, block_rows=block_rows)
    np.testing.assert_allclose(out, [f1[a] @ f2[b] for a, b in zip(r1, r2)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_rows", [5, None])
def test_pair_scores_bipartite_layout(block_rows):
    """IJB-C's layout: the first column uses some templates and the second the others, ids interleaved.

    Blocks score only that grid and must give the same scores in pair order.
    """
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((60, 16)).astype(np.float32)
    perm = rng.permutation(60)
    enroll, verif = np.sort(perm[:12]), perm[12:]
    r1, r2 = enroll[rng.integers(0, 12, 3000)], verif[rng.integers(0, 48, 3000)]
    r2[:5] = verif[0]  # a verification template used by a few pairs only
    blocks = ijb.pair_scores(feats, feats, r1, r2, method="blocks", block_rows=block_rows)
    gather = ijb.pair_scores(feats, feats, r1, r2, method="gather")
    np.testing.assert_allclose(blocks, np.einsum("ij,ij->i", feats[r1], feats[r2]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks, gather, rtol=1e-5, atol=1e-6)
    assert ijb.pair_scores(feats, feats, r1[:0], r2[:0]).shape == (0,)


# ------------------------------------------------------------------------------------------------ 1:N


def test_identification_hand_computed():
    gallery = np.eye(3)  # so each probe row *is* its score vector
    gallery_ids = np.array([1, 2, 3])
    probes = np.array(
        [
            [0.9, 0.2, 0.1],  # subject 1: correct, rank 0
            [0.5, 0.6, 0.1],  # subject 2: correct, rank 0
            [0.7, 0.1, 0.4],  # subject 3: wrong (0.4 < 0.7), rank 1
            [0.3, 0.5, 0.2],  # non-mated, max 0.5
            [0.8, 0.1, 0.1],  # non-mated, max 0.8
            [0.1, 0.2, 0.55],  # non-mated, max 0.55
        ]
    )
    probe_ids = np.array([1, 2, 3, 9, 8, 7])
    fpirs = (0.1, 0.5, 1.0)
    ref = ijb.identification_metrics(probes, probe_ids, gallery, gallery_ids, fpirs=fpirs, chunk_size=4)
    # Non-mated maxima descending: [0.8, 0.55, 0.5]. int(3*0.1)-1 -> 0; int(1.5)-1 -> 0; int(3)-1 -> 2.
    assert ref["thresholds"] == pytest.approx({"1e-01": 0.8, "5e-01": 0.8, "1e+00": 0.5})
    assert ref["tpir"] == pytest.approx({"1e-01": 1 / 3, "5e-01": 1 / 3, "1e+00": 2 / 3})
    ceil = ijb.identification_metrics(probes, probe_ids, gallery, gallery_ids, fpirs=fpirs, far_index="ceil")
    # ceil(1.5)-1 -> 1: threshold 0.55 also admits the second probe (0.6).
    assert ceil["thresholds"]["5e-01"] == pytest.approx(0.55)
    assert ceil["tpir"]["5e-01"] == pytest.approx(2 / 3)
    assert (ref["top1"], ref["top5"], ref["hits1"]) == (pytest.approx(2 / 3), 1.0, 2)
    assert (ref["num_mated"], ref["num_nonmated"]) == (3, 3)
    assert len(ref["tpir_curve"]) == 101


def test_reference_fpir_grid():
    assert len(ijb.FPIR_GRID) == 101
    assert [ijb.far_label(f) for f in ijb.FPIRS_1TON] == ["1e-04", "1e-03", "1e-02", "1e-01", "1e+00"]
    # The reference's float for 1e-3 is slightly above 1e-3, so int(8000*far) is 8, not 7.
    assert int(8000 * ijb.FPIRS_1TON[1]) == 8


# ------------------------------------------------------------------------------------------------ end to end

N_SUBJECTS, TEMPLATES_PER_SUBJECT = 4, 3
GALLERY_SETS = {"G1": (0, 1), "G2": (2, 3)}  # subject indices enrolled in each gallery


def _write_ijbc(root, rng):
    """A miniature IJB-C release: loose crops with landmarks, templates of several media, pairs, 1:N CSVs."""
    meta = root / "IJBC" / "meta"
    crops = root / "IJBC" / "loose_crop"
    meta.mkdir(parents=True)
    crops.mkdir(parents=True)
    faces = rng.integers(0, 256, (N_SUBJECTS, 14, 14, 3), dtype=np.uint8)
    tid_lines, lmk_lines, info = [], [], []  # info: (name, template, media, subject)
    img_id, media_id = 1, 1000
    for s in range(N_SUBJECTS):
        face = cv2.resize(faces[s], (112, 112), interpolation=cv2.INTER_LINEAR)
        for t in range(TEMPLATES_PER_SUBJECT):
            template = 100 * (s + 1) + t
            for _ in range(int(rng.integers(1, 4))):  # media per template
                for _ in range(int(rng.integers(1, 3))):  # images per media
                    name = f"{img_id}.png"
                    scale, angle = rng.uniform(0.9, 1.4), rng.uniform(-0.3, 0.3)
                    m = cv2.getRotationMatrix2D((56, 56), np.degrees(angle), scale)
                    m[:, 2] += rng.uniform(10, 30, 2)
                    size = (150, 160) if img_id % 2 else (140, 140)
                    noisy = np.clip(face.astype(int) + rng.integers(-20, 21, face.shape), 0, 255).astype(np.uint8)
                    img = cv2.warpAffine(noisy, m, size)
                    if img_id % 5 == 0:  # some grey images (cv2.imread gives 3 equal channels)
                        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
                        cv2.imwrite(str(crops / name), img)
                    else:
                        cv2.imwrite(str(crops / name), img[:, :, ::-1])
                    lmk = ijb.REFERENCE_LANDMARKS @ m[:, :2].T + m[:, 2] + rng.normal(0, 0.7, (5, 2))
                    score = rng.uniform(0.5, 1.0)
                    tid_lines.append(f"{name} {template} {media_id}")
                    lmk_lines.append(" ".join([name, *(f"{v:.4f}" for v in lmk.ravel()), f"{score:.4f}"]))
                    info.append((name, template, media_id, s + 1))
                    img_id += 1
                media_id += 1
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")

    templates = sorted({(t, s) for _, t, _, s in info})
    pairs = [f"{a} {b} {int(sa == sb)}" for i, (a, sa) in enumerate(templates) for b, sb in templates[i + 1 :]]
    (meta / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")

    def csv_rows(keep):  # one row per image, as the release
        return ["TEMPLATE_ID,SUBJECT_ID,FILENAME"] + [f"{t},{s},img/{n}" for n, t, _, s in info if keep(t, s)]

    for g, subjects in _gallery_subjects().items():
        (meta / f"ijbc_1N_gallery_{g}.csv").write_text(
            "\n".join(csv_rows(lambda t, s, subjects=subjects: s in subjects and t % 100 == 0)) + "\n"
        )
    (meta / "ijbc_1N_probe_mixed.csv").write_text("\n".join(csv_rows(lambda t, s: t % 100 != 0)) + "\n")
    return info


def _gallery_subjects():
    return {g: {i + 1 for i in idx} for g, idx in GALLERY_SETS.items()}


def _reference_image_feature(path, lmk, score, model, scale=0.0078125):
    img = cv2.imread(str(path))
    st = SimilarityTransform.from_estimate(lmk, ijb.REFERENCE_LANDMARKS)
    face = cv2.warpAffine(img, st.params[:2], (112, 112), borderValue=0.0)[:, :, ::-1]
    x = np.stack([face, face[:, ::-1]]).astype(np.float32)
    e = model((x - 127.5) * scale)
    return (e[0] + e[1]) * score


def _reference_templates(info, feats):
    out = {}
    for t in sorted({t for _, t, _, _ in info}):
        media = {}
        for (_, tt, m, _), f in zip(info, feats):
            if tt == t:
                media.setdefault(m, []).append(f)
        v = sum(np.mean(fs, axis=0) for fs in media.values())
        out[t] = v / np.linalg.norm(v)
    return out


def _reference_1n(probes, gallery, fars):
    """Per-probe loop following docs/deviations.md §5 (IJB-C) (probes/gallery: lists of (subject, feature))."""
    g_ids = np.array([s for s, _ in gallery])
    g = np.stack([f for _, f in gallery])
    pos, correct, nonmated, hits = [], [], [], {1: 0, 5: 0, 10: 0}
    for sid, f in probes:
        s = g @ f
        if sid in g_ids:
            target = int(np.flatnonzero(g_ids == sid)[0])
            order = np.argsort(-s)
            for k in hits:
                hits[k] += target in order[:k]
            pos.append(s[target])
            correct.append(s[target] > np.max(s[g_ids != sid]))
        else:
            nonmated.append(s.max())
    srt = np.sort(nonmated)[::-1]
    tpir = [np.mean([c and p > srt[max(int(len(srt) * far) - 1, 0)] for p, c in zip(pos, correct)]) for far in fars]
    return tpir, hits, len(pos)


@pytest.fixture(scope="module")
def ijbc_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    info = _write_ijbc(root, np.random.default_rng(5))
    return root, info


def test_meta_parsing(ijbc_fixture):
    root, info = ijbc_fixture
    meta = ijb.load_ijb_meta(root, "IJBC")
    assert list(meta.names) == [n for n, *_ in info]
    np.testing.assert_array_equal(meta.templates, [t for _, t, _, _ in info])
    assert meta.landmarks.shape == (len(info), 5, 2)
    assert set(meta.galleries) == {"G1", "G2"}
    np.testing.assert_array_equal(meta.galleries["G1"][0], [100, 200])
    np.testing.assert_array_equal(meta.galleries["G1"][1], [1, 2])
    assert meta.probes[0].size == N_SUBJECTS * (TEMPLATES_PER_SUBJECT - 1)
    # The IJBC folder itself is accepted as root too.
    assert ijb.load_ijb_meta(root / "IJBC", "IJBC").pairs.shape == meta.pairs.shape


def test_meta_errors_name_the_file(tmp_path, ijbc_fixture):
    root, _ = ijbc_fixture
    with pytest.raises(FileNotFoundError, match="IJBB/meta"):
        ijb.load_ijb_meta(root, "IJBB")
    bad = tmp_path / "IJBC" / "meta"
    bad.mkdir(parents=True)
    for f in (root / "IJBC" / "meta").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "ijbc_template_pair_label.txt").write_text("100 999 1\n")
    with pytest.raises(ValueError, match="ijbc_template_pair_label.txt.*999"):
        ijb.load_ijb_meta(tmp_path, "IJBC")


def test_end_to_end_self_and_cross(ijbc_fixture):
    root, info = ijbc_fixture
    old, new = ProjectionEmbedder(seed=0), ProjectionEmbedder(seed=1)
    rows = [("old", "old"), ("new", "new"), ("new", "old")]
    res = ijb.evaluate_ijb(root, {"old": old, "new": new}, rows, batch_size=5, num_workers=3)
    assert set(res) == {"old/old", "new/new", "new/old"}

    crops = root / "IJBC" / "loose_crop"
    meta = ijb.load_ijb_meta(root)
    tmpl = {}
    for name, model in (("old", old), ("new", new)):
        feats = [
            _reference_image_feature(crops / n, meta.landmarks[i], meta.scores[i], model)
            for i, n in enumerate(meta.names)
        ]
        tmpl[name] = _reference_templates(info, feats)

    # A template vector computed by hand from its images.
    uniq, tf = ijb.template_features(
        ijb.image_features(meta, {"new": new}, batch_size=4, num_workers=2)["new"], meta.templates, meta.medias
    )
    np.testing.assert_allclose(tf[np.searchsorted(uniq, 201)], tmpl["new"][201], rtol=1e-4, atol=1e-5)

    galleries = _gallery_subjects()
    subject_of = {t: s for _, t, _, s in info}
    probe_t = sorted(t for t in subject_of if t % 100 != 0)
    for row, (q, g) in {"old/old": ("old", "old"), "new/old": ("new", "old")}.items():
        # 1:1: p1 by the gallery model, p2 by the query model.
        scores = np.array([tmpl[g][a] @ tmpl[q][b] for a, b in meta.pairs])
        fpr, tpr, _ = roc_curve(meta.labels, scores)
        fpr, tpr = fpr[::-1], tpr[::-1]
        got = res[row]["1:1"]
        assert got["auc"] == pytest.approx(auc(fpr[::-1], tpr[::-1]), abs=1e-6)
        for far in ijb.FARS_1TO1:
            assert got["tar_at_far"][f"{far:.0e}"] == pytest.approx(tpr[np.argmin(np.abs(fpr - far))])
        # 1:N: galleries by the gallery model, probes by the query model.
        probes = [(subject_of[t], tmpl[q][t]) for t in probe_t]
        hits_all = {1: 0, 5: 0, 10: 0}
        for gname, subjects in galleries.items():
            gallery = [(s, tmpl[g][100 * s]) for s in sorted(subjects)]
            tpir, hits, n_mated = _reference_1n(probes, gallery, ijb.FPIRS_1TON)
            got = res[row]["1:N"][gname]
            assert list(got["tpir"].values()) == pytest.approx(tpir)
            assert got["top1"] == pytest.approx(hits[1] / n_mated)
            assert got["num_mated"] == n_mated
            for k in hits_all:
                hits_all[k] += hits[k]
        assert res[row]["1:N"]["mean"]["top1"] == pytest.approx(hits_all[1] / len(probe_t))
    assert res["new/new"]["1:1"]["auc"] > 0.9  # templates of a subject share a face: meaningful scores

    # Identical old and new models: cross == self.
    same = ijb.evaluate_ijb(root, {"old": old, "new": old}, [("old", "old"), ("new", "old")], tasks=("1:1",))
    assert same["new/old"] == same["old/old"]


def test_clean_scale_and_smaller_model(ijbc_fixture):
    root, _ = ijbc_fixture
    meta = ijb.load_ijb_meta(root, identification=False)
    model = ProjectionEmbedder(seed=2)
    ref = ijb.image_features(meta, {"m": model}, scale="reference", num_workers=1)["m"]
    clean = ijb.image_features(meta, {"m": model}, scale="clean", num_workers=1)["m"]
    # A linear model: the two scales differ by exactly 128/127.5.
    np.testing.assert_allclose(clean, ref * (128 / 127.5), rtol=1e-4, atol=1e-3)
    small = ProjectionEmbedder(image_size=56, seed=3)
    both = ijb.image_features(meta, {"m": model, "s": small}, num_workers=2)
    assert both["s"].shape == (len(meta.names), 16)
    np.testing.assert_allclose(both["m"], ref, rtol=1e-5, atol=1e-4)
    res = ijb.evaluate_ijb(root, {"s": small}, [("s", "s")], tasks=("1:1",), meta=meta)
    assert math.isfinite(res["s/s"]["1:1"]["auc"])


def test_evaluate_cli_function_ijbc(ijbc_fixture, tmp_path):
    from mixbct_jax.evaluate import evaluate

    root, _ = ijbc_fixture
    old, new = ProjectionEmbedder(seed=0), ProjectionEmbedder(seed=1)
    res = evaluate(new, old, [("ijbc", str(root))], tmp_path, batch_size=16, ijb_far_index="ceil", num_workers=2)
    direct = ijb.evaluate_ijb(
        root, {"old": old, "new": new}, [("old", "old"), ("new", "new"), ("new", "old")], far_index="ceil"
    )
    rows = res["protocols"]["ijbc"]["rows"]
    assert set(rows) == {"old/old", "new/new", "new/old"}
    for r in rows:
        assert rows[r]["1:1"]["tar_at_far"] == pytest.approx(direct[r]["1:1"]["tar_at_far"])
        assert rows[r]["1:N"]["mean"]["tpir"] == pytest.approx(direct[r]["1:N"]["mean"]["tpir"])
    assert (tmp_path / "ijbc_roc.png").exists() and (tmp_path / "ijbc_tpir_fpir.png").exists()
    assert "### 1:N" in (tmp_path / "report.md").read_text()
