"""`--decode`: the webdataset chain's encode stage (store/stream.py), Phase A's batches and extract's store
decoded in the main process against the CPU path, and the option's checks. The device path runs here on
the CPU (torchvision's libjpeg-turbo decoder standing in for nvJPEG); bench/decode.py times it on a GPU."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipeline.errors import UserError
from pipeline.models import build_transforms
from pipeline.tensor_transforms import TensorTransform
from stages.extract.config import ExtractConfig
from stages.phase_a.config import PhaseAConfig
from stages.prepare.writer import Spec, write_dataset
from store.features import FeatureStore
from store.shards import load_dataset
from pipeline.images import BadImage
from store.stream import (Encoded, collate_encoded, decode_batch, decode_on_device, encode_batch, encode_sample,
                          sample_stream)
from test_images import jpeg_declaring
from test_tensor_transforms import TRAIN_MAX, TRAIN_MEAN, levels, photo

CPU = torch.device("cpu")


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _rgb(seed: int) -> Image.Image:
    return Image.open(io.BytesIO(photo(seed, 60 + seed % 7, 44 + seed % 5))).convert("RGB")


TRUNCATED = photo(99, 60, 44)[:1000]  # its header reads, its data does not


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """4 classes; train: 3 shards of JPEGs with a PNG, a grey JPEG and a CMYK JPEG among them; val:
    JPEGs and one whose data is cut short."""
    def spec(key, label, data, ext="jpg"):
        return Spec(key, label, lambda: (ext, data))

    train = [spec(f"t{i:03d}", i % 4, photo(i, 60 + i % 7, 44 + i % 5)) for i in range(24)]
    train[5] = spec("t005", 1, _encoded(_rgb(5), "PNG"), "png")
    train[9] = spec("t009", 1, _encoded(_rgb(9).convert("L"), "JPEG"))
    train[14] = spec("t014", 2, _encoded(_rgb(14).convert("CMYK"), "JPEG"))
    val = [spec(f"v{i:03d}", i % 4, photo(100 + i, 52, 60)) for i in range(8)]
    val[3] = spec("v003", 3, TRUNCATED)
    out = tmp_path_factory.mktemp("jpeg") / "data"
    write_dataset(out, "jpeg-lt", ["cat", "dog", "fox", "owl"], {"train": train, "val": val}, "test", shard_size=8)
    return out


def test_the_encode_stage_keeps_jpegs_compressed_and_decodes_the_rest(jpeg_data):
    urls = load_dataset(jpeg_data).urls("train")
    tensor = TensorTransform(build_transforms(32)[0])
    items = list(sample_stream(urls, split_by_worker=False, draw=tensor.draw))
    kinds = {key: isinstance(enc.data, bytes) for key, enc, _ in items}
    assert len(items) == 24 and not kinds["t005"] and kinds["t009"] and not kinds["t014"]  # PNG, grey, CMYK
    assert sum(kinds.values()) == 22 and all(len(enc.params) == 3 for _, enc, _ in items)
    keys, batch, labels = collate_encoded(items)
    assert len(batch.jpegs) == sum(len(enc.data) for _, enc, _ in items if isinstance(enc.data, bytes))
    assert len(batch.decoded) == 2 and labels.tolist() == [label for _, _, label in items]
    keep, images = decode_batch(keys, batch, CPU)
    assert keep == list(range(24))
    reference = {key: np.asarray(img) for key, img, _ in sample_stream(urls, split_by_worker=False)}
    for key, img in zip(keys, images):
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        diff = np.abs(img.permute(1, 2, 0).numpy().astype(int) - reference[key].astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, key  # the same decoder family, the same pixels


def test_an_image_no_decoder_reads_is_skipped_or_refused_as_on_the_cpu_path(jpeg_data):
    urls = load_dataset(jpeg_data).urls("val")
    cpu_bad = []
    keys_cpu = [k for k, _, _ in sample_stream(urls, split_by_worker=False, skip_bad=True, on_bad=cpu_bad.append)]
    items = list(sample_stream(urls, split_by_worker=False, draw=lambda size, key: None))
    keys, batch, _ = collate_encoded(items)
    assert "v003" in keys  # the header reads: only decoding finds out
    bad = []
    keep, images = decode_batch(keys, batch, CPU, skip_bad=True, on_bad=bad.append)
    assert bad == cpu_bad == ["v003"] and [keys[i] for i in keep] == keys_cpu and len(images) == len(keep)
    with pytest.raises(UserError, match=r"^sample 'v003' in .*val/shard-000000.tar: unreadable image \(truncated file\); "
                                        r"pass --skip-bad to skip unreadable images$"):
        decode_batch(keys, batch, CPU)
    garbage = Encoded(b"\xff\xd8\xff" + bytes(50), None)  # a "JPEG" nothing reads, header included
    keep, _ = decode_batch(["a", "b"], encode_batch([garbage, items[0][1]]), CPU, skip_bad=True, on_bad=bad.append)
    assert keep == [1] and bad[-1] == "a"


def test_the_encode_stage_applies_the_pixel_limit_from_the_header_before_the_device_decodes(jpeg_data):
    drawn = []

    def sample(data: bytes) -> dict:
        return {"__key__": "k", "__url__": "a.tar", "jpg": data, "cls": b"0"}

    bomb = jpeg_declaring(20_000, 20_000)  # a real JPEG's header rewritten: nvJPEG would allocate 1.2 GB for it
    with pytest.raises(BadImage, match=r"^sample 'k' in a.tar: unreadable image \(decompression bomb: 20000×20000 = "
                                       r"400,000,000 pixels, above --max-pixels 89,478,485\)$"):
        encode_sample(sample(bomb), lambda size, key: drawn.append(size))
    assert drawn == []  # refused before anything was drawn or handed on
    key, enc, label = encode_sample(sample(bomb), lambda size, key: drawn.append(size), max_pixels=10**9)
    assert enc.data == bomb and drawn == [(20_000, 20_000)] and enc.where == "sample 'k' in a.tar"  # only read

    urls = load_dataset(jpeg_data).urls("train")  # 60 × 44 and larger: all above 2,000 pixels
    with pytest.raises(UserError, match=r"^sample 't\d+' in .*shard-00000\d.tar: unreadable image \(decompression "
                                        r"bomb: \d+×\d+ = [\d,]+ pixels, above --max-pixels 2,000\); pass --skip-bad"):
        list(sample_stream(urls, split_by_worker=False, draw=lambda size, key: None, max_pixels=2000))
    bad = []
    assert list(sample_stream(urls, split_by_worker=False, draw=lambda size, key: None, max_pixels=2000,
                              skip_bad=True, on_bad=bad.append)) == []
    assert len(bad) == 24


@pytest.mark.parametrize("workers", [0, 2])
def test_phase_a_batches_decoded_on_the_device_follow_the_cpu_path(jpeg_data, tiny_backbone, workers):
    from stages.phase_a.data import eval_batches, train_batches

    urls = load_dataset(jpeg_data).urls("train")
    common = dict(seed=1, epoch=2, micro_batch=4, workers=workers, shuffle_buffer=8, distributed=False)
    batches = []
    for decode_on in (None, CPU):  # without workers the main process's generator draws: seeded alike
        torch.manual_seed(5)
        stream = train_batches(urls, tiny_backbone.train_transform, decode_on=decode_on, **common)
        batches.append([next(stream) for _ in range(8)])  # more than an epoch's 24 samples
    std = tiny_backbone.train_transform.transforms[-1].std
    for (keys_a, x_a, y_a), (keys_b, x_b, y_b) in zip(*batches):
        assert keys_a == keys_b and torch.equal(y_a, y_b)  # the same order
        for a, b in zip(x_a, x_b):  # the same crops, flips and jitter: pixels within the transform tolerance
            diff = levels(a, b, std)
            assert diff.max() <= TRAIN_MAX + 1e-3 and diff.mean() <= TRAIN_MEAN
    val = load_dataset(jpeg_data).urls("val")  # v003 is dropped before batching on the CPU path, after on the device
    (x_a, y_a), (x_b, y_b) = ([torch.cat(t) for t in zip(*eval_batches(val, tiny_backbone.eval_transform, batch=4,
                                                                       workers=workers, limit=7, decode_on=on,
                                                                       skip_bad=True))]
                              for on in (None, CPU))
    assert len(y_a) == 7 and torch.equal(y_a, y_b) and levels(x_a, x_b, std).max() <= 1 + 1e-3


def test_extract_decoded_on_the_device_stores_what_the_cpu_path_stores(jpeg_data, tmp_path, monkeypatch,
                                                                       single_thread):
    import stages.extract.run
    from stages.extract.run import extract

    # This machine may have no GPU: the stage's choice is forced, the decoding runs on the CPU device.
    monkeypatch.setattr(stages.extract.run, "decode_on_device", lambda mode, device, urls: mode == "gpu")
    args = dict(model="ballad-tiny", batch_size=8, workers=0, dtype="float32", train_views=2, test_views="five-crop",
                skip_bad=True)
    extract("none", jpeg_data, tmp_path / "cpu.zarr", decode="cpu", **args)
    extract("none", jpeg_data, tmp_path / "gpu.zarr", decode="gpu", **args)
    a, b = FeatureStore.open(tmp_path / "cpu.zarr"), FeatureStore.open(tmp_path / "gpu.zarr")
    assert a.meta["decode"] == {"train": "cpu", "val": "cpu"} and b.meta["decode"] == {"train": "gpu", "val": "gpu"}
    assert b.meta["command"].endswith("--decode gpu")
    for split in ("train", "val"):
        assert list(a.keys(split)) == list(b.keys(split)) and a.skipped(split) == b.skipped(split)
        (fa, la), (fb, lb) = a.features(split), b.features(split)
        assert np.array_equal(la, lb)
        _close(fa, fb)
    assert b.skipped("val") == ["v003"]
    _close(a.views("train"), b.views("train"))  # the same seeded draws per view
    _close(a.tta_features("val"), b.tta_features("val"))


def _close(a: np.ndarray, b: np.ndarray):
    """Features of the same images (pixels a few 1/255 apart), as [N, D] features or [E, N, D] views:
    each of ``b`` nearest to its own counterpart in ``a`` among the alternatives, other images for
    features, the image's other views for views (the random-init model puts all images close)."""
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    dist = torch.cdist(b, a) if a.dim() == 2 else torch.cdist(b.transpose(0, 1), a.transpose(0, 1))
    own = dist.diagonal(dim1=-2, dim2=-1)
    others = (dist + torch.eye(dist.shape[-1]) * 1e9).amin(-1)
    ratio = own / others  # 0.004–0.06 for features here; views: two views can be alike, up to 0.47
    assert ratio.max() < 0.6 and ratio.median() < 0.1


def test_decode_gpu_without_cuda_is_refused_in_one_line_before_any_work(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runner = CliRunner()
    for args, out in ((["extract", "--ckpt", "none", "--model", "ballad-tiny", "--data", str(tiny_data),
                        "--out", str(tmp_path / "f.zarr")], tmp_path / "f.zarr"),
                      (["phase-a", "--model", "ballad-tiny", "--data", str(tiny_data),
                        "--out", str(tmp_path / "pa")], tmp_path / "pa")):
        result = runner.invoke(main, [*args, "--decode", "gpu"])
        assert result.exit_code != 0
        assert result.output.strip().splitlines() == ["Error: --decode gpu: CUDA is not available on this machine"]
        assert not out.exists()
        result = runner.invoke(main, [*args, "--decode", "fast"])
        assert result.exit_code != 0 and "--decode" in result.output
    for config in (ExtractConfig(ckpt=None, data="d", out="o", decode="fast"),
                   PhaseAConfig(data="d", model="m", decode="fast")):
        with pytest.raises(UserError, match="^--decode fast: choose one of auto, cpu, gpu$"):
            config.check()


def test_decode_auto_is_the_device_for_jpegs_on_cuda_only(jpeg_data, tiny_data, monkeypatch):
    jpegs, pngs = load_dataset(jpeg_data).urls("train"), load_dataset(tiny_data).urls("train")
    cuda = torch.device("cuda")  # a device name: nothing runs on it here
    assert decode_on_device("auto", cuda, jpegs) and not decode_on_device("auto", cuda, pngs)
    assert not decode_on_device("auto", CPU, jpegs) and not decode_on_device("cpu", cuda, jpegs)
    assert decode_on_device("gpu", cuda, pngs)  # asked for: PNGs are then decoded in the workers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match=r"^--decode gpu: the model runs on cpu \(--device\); use --decode cpu$"):
        decode_on_device("gpu", CPU, jpegs)
