from __future__ import annotations

import ast
import hashlib
import inspect
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from omnilabel.errors import CheckpointError
from omnilabel.models import registry
from omnilabel.models.registry import (
    REGISTRY,
    WeightFile,
    WeightSpec,
    cache_dir,
    download,
    is_cached,
    list_weights,
    offline,
    resolve,
    weight_path,
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNILABEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OMNILABEL_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def _serve(tmp_path: Path, name: str, content: bytes) -> str:
    src = tmp_path / "remote" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(content)
    return src.as_uri()


@pytest.fixture
def local_urlopen(monkeypatch):
    """Allow file:// URLs only (the real opener), keeping the network out of reach."""
    real = urllib.request.build_opener(urllib.request.FileHandler()).open

    def opener(url, *args, **kwargs):
        if not str(url).startswith("file://"):
            raise urllib.error.URLError("network is unreachable")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", opener)


def _register(monkeypatch, spec: WeightSpec) -> None:
    monkeypatch.setitem(REGISTRY, spec.name, spec)


def test_registry_lists_the_official_weights():
    names = {s.name: s for s in list_weights()}
    assert {"vit_b", "vit_l", "vit_h", "grounding-dino-tiny", "grounding-dino-base", "clip-vit-b-32"} <= set(names)
    vit_h = names["vit_h"]
    assert vit_h.kind == "sam" and vit_h.architecture == "vit_h"
    assert vit_h.files[0].url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert vit_h.files[0].sha256 == "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"
    tiny = names["grounding-dino-tiny"]
    assert tiny.kind == "gdino" and len(tiny.files) == 7
    assert tiny.files[1].url == "https://huggingface.co/IDEA-Research/grounding-dino-tiny/resolve/main/model.safetensors"
    assert names["clip-vit-b-32"].architecture == "ViT-B-32"
    resnets = [s for s in names.values() if s.kind == "resnet"]
    assert [s.name for s in resnets] == ["resnet-18", "resnet-34", "resnet-50", "resnet-101", "resnet-152"]
    for spec in resnets:
        assert spec.license == "Apache-2.0" and spec.architecture == f"microsoft/{spec.name}"
        hf = f"https://huggingface.co/microsoft/{spec.name}/resolve/main/"
        assert [wf.url for wf in spec.files] == [hf + "config.json", hf + "model.safetensors"]
    dinov2 = [s for s in names.values() if s.kind == "dinov2"]
    assert [s.name for s in dinov2] == ["dinov2-small", "dinov2-base"]
    for spec in dinov2:
        assert spec.license == "Apache-2.0" and spec.architecture == f"facebook/{spec.name}"
        hf = f"https://huggingface.co/facebook/{spec.name}/resolve/main/"
        assert [wf.url for wf in spec.files] == [hf + "config.json", hf + "model.safetensors"]
    for spec in names.values():
        for wf in spec.files:
            assert wf.sha256 is None or len(wf.sha256) == 64


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("OMNILABEL_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "omnilabel"


def test_weight_path_is_a_file_for_sam_and_a_directory_for_gdino(tmp_path):
    assert weight_path("vit_b") == tmp_path / "cache" / "vit_b" / "sam_vit_b_01ec64.pth"
    assert weight_path("clip-vit-b-32") == tmp_path / "cache" / "clip-vit-b-32" / "open_clip_pytorch_model.bin"
    assert weight_path("grounding-dino-base") == tmp_path / "cache" / "grounding-dino-base"
    assert weight_path("resnet-50") == tmp_path / "cache" / "resnet-50"
    with pytest.raises(CheckpointError, match="vit_b"):
        weight_path("vit_x")


def test_download_from_a_file_url_verifies_sha256(tmp_path, monkeypatch, local_urlopen):
    content = b"sam weights" * 1000
    url = _serve(tmp_path, "ckpt.pth", content)
    spec = WeightSpec("tiny-sam", "sam", (WeightFile("ckpt.pth", url, hashlib.sha256(content).hexdigest()),),
                      "test", "MIT")
    _register(monkeypatch, spec)
    assert not is_cached("tiny-sam")
    path = download("tiny-sam")
    assert path == tmp_path / "cache" / "tiny-sam" / "ckpt.pth"
    assert path.read_bytes() == content
    assert is_cached("tiny-sam")
    assert resolve("tiny-sam", kind="sam") == path
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth"]  # no temporary file left


def test_download_reports_progress_as_events(tmp_path, monkeypatch, local_urlopen):
    content = b"x" * 5000
    url = _serve(tmp_path, "c.bin", content)
    _register(monkeypatch, WeightSpec("tiny-clip", "clip", (WeightFile("c.bin", url, None, 5000),), "t", "MIT"))
    events: list[dict] = []
    assert download("tiny-clip", on_event=events.append).read_bytes() == content
    assert events[0] == {"event": "download", "file": "c.bin", "done": 0, "total": 5000}
    assert events[-1] == {"event": "download", "file": "c.bin", "done": 5000, "total": 5000}
    assert len(events) == 2  # less than 1 MiB: the start and the end only
    events.clear()
    assert resolve("tiny-clip", kind="clip", on_event=events.append).read_bytes() == content
    assert events == []  # cached: nothing downloaded


def test_download_events_come_at_most_once_per_mib(tmp_path, monkeypatch, local_urlopen):
    mib = 1 << 20
    content = bytes(range(256)) * (mib * 5 // 2 // 256)  # 2.5 MiB
    url = _serve(tmp_path, "big.bin", content)
    files = (WeightFile("config.json", _serve(tmp_path, "config.json", b"{}")), WeightFile("big.bin", url))
    _register(monkeypatch, WeightSpec("tiny-dir", "gdino", files, "t", "MIT"))
    events: list[dict] = []
    path = resolve("tiny-dir", kind="gdino", on_event=events.append)
    assert (path / "big.bin").read_bytes() == content
    assert {e["event"] for e in events} == {"download"}
    big = [e["done"] for e in events if e["file"] == "big.bin"]
    assert big[0] == 0 and big[-1] == len(content) and big == sorted(big)
    gaps = [b - a for a, b in zip(big, big[1:], strict=False)]
    assert len(gaps) >= 2 and all(gap >= mib for gap in gaps[:-1])  # only the final event may come sooner
    assert [e["done"] for e in events if e["file"] == "config.json"] == [0, 2]


def test_registry_draws_nothing():
    """Progress goes to the caller's callback; the registry itself never imports rich."""
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "omnilabel.events" in imported and not any(m.split(".")[0] == "rich" for m in imported)
    assert "progress" not in inspect.signature(download).parameters
    assert "on_event" in inspect.signature(resolve).parameters


def test_sha256_mismatch_deletes_the_file(tmp_path, monkeypatch, local_urlopen):
    url = _serve(tmp_path, "ckpt.pth", b"corrupt")
    spec = WeightSpec("bad", "sam", (WeightFile("ckpt.pth", url, "0" * 64),), "test", "MIT")
    _register(monkeypatch, spec)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        download("bad")
    folder = tmp_path / "cache" / "bad"
    assert not any(folder.iterdir())
    assert not is_cached("bad")


def test_size_is_checked_when_no_sha256_is_known(tmp_path, monkeypatch, local_urlopen):
    url = _serve(tmp_path, "c.bin", b"12345")
    _register(monkeypatch, WeightSpec("sized", "clip", (WeightFile("c.bin", url, None, 6),), "t", "MIT"))
    with pytest.raises(CheckpointError, match="size mismatch"):
        download("sized")
    assert not is_cached("sized")


def test_multi_file_download_fills_a_directory_and_skips_cached_files(tmp_path, monkeypatch, local_urlopen):
    files = tuple(WeightFile(n, _serve(tmp_path, n, n.encode())) for n in ("config.json", "model.safetensors"))
    _register(monkeypatch, WeightSpec("tiny-gdino", "gdino", files, "t", "Apache-2.0"))
    path = download("tiny-gdino")
    assert path.is_dir() and sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "remote" / "config.json").unlink()  # a second call must not touch the network
    assert download("tiny-gdino") == path
    with pytest.raises(CheckpointError, match="config.json"):
        download("tiny-gdino", force=True)


def test_network_failure_names_the_file_the_path_and_the_command(tmp_path):
    with pytest.raises(CheckpointError) as info:
        resolve("vit_b", kind="sam")
    msg = str(info.value)
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    assert str(tmp_path / "cache" / "vit_b" / "sam_vit_b_01ec64.pth") in msg
    assert "omnilabel weights download vit_b" in msg
    assert "network is unreachable" in msg
    assert not (tmp_path / "cache" / "vit_b" / "sam_vit_b_01ec64.pth").exists()


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), (" Yes ", True), ("on", True),
                                               ("0", False), ("", False), ("no", False)])
def test_offline_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("OMNILABEL_OFFLINE", value)
    assert offline() is expected


def test_offline_forbids_downloads(tmp_path, monkeypatch, local_urlopen):
    monkeypatch.setenv("OMNILABEL_OFFLINE", "1")
    url = _serve(tmp_path, "ckpt.pth", b"w")
    _register(monkeypatch, WeightSpec("local", "sam", (WeightFile("ckpt.pth", url),), "t", "MIT"))
    with pytest.raises(CheckpointError) as info:
        resolve("local", kind="sam")
    msg = str(info.value)
    assert "OMNILABEL_OFFLINE" in msg
    assert str(tmp_path / "cache" / "local" / "ckpt.pth") in msg
    assert "omnilabel weights download local" in msg
    with pytest.raises(CheckpointError, match="OMNILABEL_OFFLINE"):
        download("local")


def test_gdino_offline_error_lists_every_missing_file(tmp_path, monkeypatch):
    folder = tmp_path / "cache" / "grounding-dino-tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        resolve("grounding-dino-tiny", kind="gdino", allow_download=False)
    msg = str(info.value)
    assert str(folder / "model.safetensors") in msg and str(folder / "vocab.txt") in msg
    assert str(folder / "config.json") not in msg


def test_resolve_returns_an_existing_path_as_is(tmp_path):
    ckpt = tmp_path / "my_sam.pth"
    ckpt.write_bytes(b"w")
    assert resolve(ckpt, kind="sam") == ckpt
    assert resolve(str(tmp_path), kind="gdino") == tmp_path


def test_resolve_uses_the_cache_without_downloading(tmp_path):
    target = tmp_path / "cache" / "vit_l" / "sam_vit_l_0b3195.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"cached")
    assert resolve("vit_l", kind="sam") == target  # urlopen raises: the cache must be used


def test_unknown_name_lists_the_known_names_of_that_kind():
    with pytest.raises(CheckpointError) as info:
        resolve("vit_q", kind="sam")
    msg = str(info.value)
    assert "vit_b, vit_l, vit_h" in msg and "grounding" not in msg
    with pytest.raises(CheckpointError, match="grounding-dino-tiny, grounding-dino-base"):
        resolve("/no/such/dir", kind="gdino")


def test_a_name_of_another_kind_is_refused():
    with pytest.raises(CheckpointError, match="is a sam checkpoint"):
        resolve("vit_b", kind="clip")


def test_is_cached_needs_every_file(tmp_path):
    folder = tmp_path / "cache" / "grounding-dino-base"
    folder.mkdir(parents=True)
    for wf in REGISTRY["grounding-dino-base"].files[:-1]:
        (folder / wf.filename).write_bytes(b"")
    assert not registry.is_cached("grounding-dino-base")
    (folder / REGISTRY["grounding-dino-base"].files[-1].filename).write_bytes(b"")
    assert registry.is_cached("grounding-dino-base")
    assert resolve("grounding-dino-base", kind="gdino") == folder


def test_resnet_offline_error_names_the_files_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNILABEL_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve("resnet-50", kind="resnet")
    msg = str(info.value)
    folder = tmp_path / "cache" / "resnet-50"
    assert str(folder / "config.json") in msg and str(folder / "model.safetensors") in msg
    assert "https://huggingface.co/microsoft/resnet-50/resolve/main/config.json" in msg
    assert "OMNILABEL_OFFLINE" in msg and "omnilabel weights download resnet-50" in msg
    assert not folder.exists()
    with pytest.raises(CheckpointError, match="resnet-18, resnet-34, resnet-50, resnet-101, resnet-152"):
        resolve("resnet-77", kind="resnet")


def test_dinov2_is_a_folder_and_offline_errors_name_its_files(tmp_path, monkeypatch):
    folder = tmp_path / "cache" / "dinov2-small"
    assert weight_path("dinov2-small") == folder
    monkeypatch.setenv("OMNILABEL_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve("dinov2-small", kind="dinov2")
    msg = str(info.value)
    assert str(folder / "config.json") in msg and str(folder / "model.safetensors") in msg
    assert "https://huggingface.co/facebook/dinov2-small/resolve/main/model.safetensors" in msg
    assert "omnilabel weights download dinov2-small" in msg
    with pytest.raises(CheckpointError, match="known dinov2 names: dinov2-small, dinov2-base"):
        resolve("dinov2-giant", kind="dinov2")
    with pytest.raises(CheckpointError, match="is a dinov2 checkpoint, not a resnet one"):
        resolve("dinov2-base", kind="resnet")


# --- weights found on the node that uses them ---------------------------------------------------------------


def test_a_ref_keeps_a_name_as_a_name_and_makes_a_path_absolute(tmp_path, monkeypatch):
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    by_path = registry.weight_ref("sam.pth", kind="sam")
    assert not by_path.is_name and by_path.source == str(ckpt)
    by_name = registry.weight_ref("vit_b", kind="sam")
    assert by_name.is_name and by_name.files == (("sam_vit_b_01ec64.pth", REGISTRY["vit_b"].files[0].sha256),)
    # A path the driver lacks may still be on the workers' nodes (weights only on the cluster's storage).
    assert registry.weight_ref("/cluster/weights/sam.pth", kind="sam").source == "/cluster/weights/sam.pth"
    with pytest.raises(CheckpointError, match="known sam names"):
        registry.weight_ref("vit_z", kind="sam")
    assert not (tmp_path / "cache").exists(), "making a ref must not download"


def test_locate_finds_a_name_in_this_nodes_cache_and_downloads_it_where_allowed(tmp_path, monkeypatch,
                                                                                local_urlopen):
    content = b"sam weights"
    url = _serve(tmp_path, "tiny.pth", content)
    files = (WeightFile("tiny.pth", url, hashlib.sha256(content).hexdigest()),)
    _register(monkeypatch, WeightSpec("tiny-sam", "sam", files, "t", "MIT"))
    ref = registry.weight_ref("tiny-sam", kind="sam")
    assert registry.locate(ref).read_bytes() == content
    assert registry.locate(ref) == weight_path("tiny-sam")


def test_locate_offline_names_the_node_and_says_to_download_on_every_node(monkeypatch):
    ref = registry.weight_ref("vit_b", kind="sam")
    monkeypatch.setenv("OMNILABEL_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        registry.locate(ref)
    message = str(err.value)
    assert message.startswith(f"node {registry.node_name()}: ")
    assert "omnilabel weights download vit_b` on every node" in message
    assert str(weight_path("vit_b")) in message


def test_locate_refuses_a_name_this_node_records_differently(monkeypatch):
    ref = registry.weight_ref("vit_b", kind="sam")
    other = WeightSpec("vit_b", "sam", (WeightFile("sam_vit_b_01ec64.pth", "https://x", "0" * 64),), "t", "MIT")
    monkeypatch.setitem(REGISTRY, "vit_b", other)
    with pytest.raises(CheckpointError, match="not the same here as on the driver"):
        registry.locate(ref)


def test_locate_checks_a_path_exists_here_and_is_the_drivers_file(tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"teacher v1")
    ref = registry.weight_ref(teacher, kind="teacher", sha256=hashlib.sha256(b"teacher v1").hexdigest())
    assert registry.locate(ref) == teacher
    teacher.write_bytes(b"teacher v2")
    with pytest.raises(CheckpointError, match="not the file the driver read"):
        registry.locate(ref)
    teacher.unlink()
    with pytest.raises(CheckpointError, match=f"^node {registry.node_name()}: teacher .* does not exist on this node"):
        registry.locate(ref)
