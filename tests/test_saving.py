"""Archives a server can trust: torch.save works without losing a file, every payload is hash-checked on load,
damage is named, files get the umask's or the old file's mode, and bad destinations are refused up front."""

import errno
import json
import os
import pickle
import stat
import zipfile

import pytest
import timm
import torch

import tokenopt


@pytest.fixture(scope="module")
def gm():
    torch.manual_seed(0)
    return tokenopt.optimize(timm.create_model("deit_tiny_patch16_224", depth=2).eval(), policy="tome", r=8)


@pytest.fixture(scope="module")
def saved(gm, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "m.pt2"
    tokenopt.save(gm, path)
    return path


def _same(a, b):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_torch_save_over_an_existing_file_works_and_round_trips(gm, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"the user's old model")
    torch.save(gm, path)  # (used to refuse only after torch had truncated the file)
    back = torch.load(path, weights_only=False)
    assert isinstance(back, tokenopt.OptimizedModule) and _same(back, gm)
    assert _same(pickle.loads(pickle.dumps(gm)), gm)


def _rewrite(src, dst, change):
    """Copy the zip ``src`` to ``dst`` with ``change(name, data) -> data`` applied to every entry."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            b.writestr(item, change(item.filename, a.read(item)))


def _flip_byte_in(path, entry_suffix, out):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(entry_suffix))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0x40
    out.write_bytes(bytes(data))


def test_one_flipped_weight_byte_is_found_and_named(saved, tmp_path):
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(saved) as z:
        weight = max((i for i in z.infolist() if "/data/weights/weight_" in i.filename), key=lambda i: i.file_size)
    _flip_byte_in(saved, weight.filename, bad)
    with pytest.raises(tokenopt.LoadError, match=r"damaged: the weights \(data/weights/weight_\d+\) does not match"):
        tokenopt.load(bad)


def test_a_damaged_graph_and_a_truncated_file_are_named(saved, tmp_path):
    bad = tmp_path / "graph.pt2"
    _flip_byte_in(saved, "/models/reduced.json", bad)
    with pytest.raises(tokenopt.LoadError, match=r"the graph \(models/reduced.json\)"):
        tokenopt.load(bad)
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(tokenopt.LoadError, match="truncated"):
        tokenopt.load(cut)


def test_broken_metadata_and_unknown_classes_get_clear_errors(saved, tmp_path):
    broken = tmp_path / "json.pt2"
    _rewrite(saved, broken, lambda name, data: data[:-7] if name.endswith("/tokenopt.json") else data)
    with pytest.raises(tokenopt.LoadError, match=r"tokenopt.json\) is not valid JSON"):
        tokenopt.load(broken)

    import hashlib

    renamed = {}

    def rename(name, data):
        if name.endswith("/tokenopt.json"):
            data = data.replace(b"tokenopt.policies.tome:ToMe", b"tokenopt.policies.tome:ToMeNoMore")
            renamed["json"] = data
        elif name.endswith("/tokenopt.json.sha256"):
            data = b""  # filled in below, once the new JSON is known
        return data

    edited = tmp_path / "edited.pt2"
    _rewrite(saved, tmp_path / "tmp.pt2", rename)
    _rewrite(tmp_path / "tmp.pt2", edited, lambda name, data: hashlib.sha256(renamed["json"]).hexdigest().encode()
             if name.endswith("/tokenopt.json.sha256") else data)
    with pytest.raises(tokenopt.LoadError, match="ToMeNoMore, which this tokenopt .* does not have"):
        tokenopt.load(edited)
    tampered = tmp_path / "tampered.pt2"  # the same edit without fixing the hash: caught as damage
    _rewrite(saved, tampered, rename)
    with pytest.raises(tokenopt.LoadError, match=r"tokenopt.json\) does not match its content hash"):
        tokenopt.load(tampered)


def test_file_modes_follow_the_umask_and_an_existing_files_mode(gm, tmp_path):
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.pt2"
        tokenopt.save(gm, fresh)
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.pt2"
        kept.write_bytes(b"old")
        os.chmod(kept, 0o640)
        tokenopt.save(gm, kept)
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and _same(tokenopt.load(kept), gm)
    finally:
        os.umask(old)


def test_a_failed_write_keeps_the_old_file_and_says_so(gm, tmp_path, monkeypatch):
    path = tmp_path / "m.pt2"
    path.write_bytes(b"the old file")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenopt.saving.os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write .*m.pt2: No space left on device; the existing file is unchanged"):
        tokenopt.save(gm, path)
    assert path.read_bytes() == b"the old file" and os.listdir(tmp_path) == ["m.pt2"]


@pytest.mark.parametrize("where, message", [
    (lambda tmp: tmp, "it is a folder; give a file name inside it"),
    (lambda tmp: tmp / "missing" / "m.pt2", "does not exist; create it first"),
    (lambda tmp: "/proc/m.pt2", "is not writable"),
])
def test_bad_destinations_are_refused_before_any_work(gm, tmp_path, where, message):
    target = where(tmp_path)
    with pytest.raises(OSError, match=message) as exc:
        tokenopt.save(gm, target)
    assert str(target) in str(exc.value) and ".tmp" not in str(exc.value)


def test_a_meta_device_graph_is_refused_with_the_fix(gm):
    import copy

    meta = copy.deepcopy(gm).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        tokenopt.save(meta, "/tmp/never-written.pt2")
    assert not os.path.exists("/tmp/never-written.pt2")


def test_loading_a_folder_or_a_non_archive(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        tokenopt.load(tmp_path)
    junk = tmp_path / "junk.pt2"
    junk.write_text(json.dumps({"not": "a zip"}))
    with pytest.raises(tokenopt.LoadError, match="not a zip file"):
        tokenopt.load(junk)


# -- what a deployment script does next -----------------------------------------------------------------------
def test_explain_of_a_loaded_model_reports_what_it_did_before_saving(gm, saved):
    import io
    import re

    from rich.console import Console

    def report(g):
        return tokenopt.explain(g, console=Console(file=io.StringIO(), width=250))

    before, after = report(gm), report(tokenopt.load(saved))
    total = re.compile(r"total ([\d.]+) GFLOPs at batch (\d+) \(([\d.]+)x")
    assert total.search(after) is not None, after
    assert total.search(after).groups() == total.search(before).groups()
    assert "realize_tokens" in before and "realize_tokens" in after


def test_train_mode_on_an_inference_graph_warns_with_the_fix(gm):
    import copy

    g = copy.deepcopy(gm)
    with pytest.warns(UserWarning, match="prepare_training"):
        g.train()
    g.eval()


@pytest.mark.parametrize("options", [dict(policy="ats", blocks=(1, 2)), dict(policy="ats", blocks=(1, 2), mode="padded"),
                                     dict(policy="tome"), dict(policy="topk", blocks=(1,), fuse=True)])
def test_deepcopy_of_every_form(options):
    import copy

    model = timm.create_model("deit_tiny_patch16_224", depth=3).eval()
    g = tokenopt.optimize(model, **options)
    twin = copy.deepcopy(g)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), g(x))


def test_concurrent_first_calls_at_a_new_image_size():
    import threading

    model = timm.create_model("vit_tiny_patch16_224", depth=2, dynamic_img_size=True).eval()
    g = tokenopt.optimize(model, policy="tome", r=4)
    x = torch.randn(2, 3, 160, 192)
    results, errors = [None] * 3, []

    def call(i):
        try:
            with torch.no_grad():
                results[i] = g(x)
        except Exception as exc:  # (collected, asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert list(g.variants) == [(160, 192)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])
