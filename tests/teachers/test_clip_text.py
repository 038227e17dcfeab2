from __future__ import annotations

import json

import numpy as np
import pytest

from omnilabel.errors import CheckpointError
from omnilabel.models.tiny_clip import TINY_CLIP_CONFIG, TINY_CLIP_MODEL_NAME, build_tiny_clip
from omnilabel.teachers.clip_text import PROMPT_TEMPLATE, ClipTextEncoder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt", seed=0)


@pytest.fixture
def encoder(tiny_clip):
    model_name, path = tiny_clip
    return ClipTextEncoder.from_pretrained(path, model_name=model_name)


def test_encodes_multi_word_names_to_unit_rows(encoder):
    names = ["traffic light", "fire hydrant", "cat", "baseball_bat"]
    emb = encoder.encode(names)
    assert emb.shape == (4, 32) and emb.dtype == np.float32
    assert encoder.width == 32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(emb).all()


def test_different_names_give_different_embeddings(encoder):
    emb = encoder.encode(["cat", "dog", "traffic light", "light"])
    sims = emb @ emb.T
    off_diag = sims[~np.eye(4, dtype=bool)]
    assert (off_diag < 1 - 1e-4).all()


def test_cache_hit_does_not_run_the_model_again(encoder):
    first = encoder.encode(["cat", "dog"])
    assert encoder.forward_calls == 1

    def fail(*args, **kwargs):
        raise AssertionError("text tower ran for a cached name")

    real = encoder.model.encode_text
    encoder.model.encode_text = fail
    again = encoder.encode(["dog", "cat", "dog"])
    assert encoder.forward_calls == 1
    np.testing.assert_array_equal(again, first[[1, 0, 1]])

    encoder.model.encode_text = real
    mixed = encoder.encode(["cat", "bird"])
    assert encoder.forward_calls == 2
    np.testing.assert_array_equal(mixed[0], first[0])


def test_embedding_does_not_depend_on_the_batch(tiny_clip, encoder):
    batch = encoder.encode(["a much longer class name", "dog", "cat"])
    other = ClipTextEncoder.from_pretrained(tiny_clip[1], model_name=tiny_clip[0])
    alone = other.encode(["dog"])
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5)


def test_batches_of_new_names(tiny_clip):
    enc = ClipTextEncoder.from_pretrained(tiny_clip[1], model_name=tiny_clip[0])
    enc.batch_size = 2
    emb = enc.encode(["a", "b", "c", "d", "e"])
    assert emb.shape == (5, 32)
    assert enc.forward_calls == 3
    assert enc.encode([]).shape == (0, 32)
    enc.clear_cache()
    enc.encode(["a"])
    assert enc.forward_calls == 4


def test_prompt_template_wraps_the_name(encoder):
    assert PROMPT_TEMPLATE.format(name="cat") == "a photo of a cat."
    seen = []
    real_tokenizer = encoder.tokenizer

    def spy(texts):
        seen.extend(texts)
        return real_tokenizer(texts)

    encoder.tokenizer = spy
    encoder.encode(["traffic_light"])
    assert seen == ["a photo of a traffic light."]


def test_same_seed_same_weights(tmp_path):
    a = ClipTextEncoder.from_pretrained(build_tiny_clip(tmp_path / "a.pt", seed=1)[1], model_name=TINY_CLIP_MODEL_NAME)
    b = ClipTextEncoder.from_pretrained(build_tiny_clip(tmp_path / "b.pt", seed=1)[1], model_name=TINY_CLIP_MODEL_NAME)
    c = ClipTextEncoder.from_pretrained(build_tiny_clip(tmp_path / "c.pt", seed=2)[1], model_name=TINY_CLIP_MODEL_NAME)
    np.testing.assert_array_equal(a.encode(["cat"]), b.encode(["cat"]))
    assert not np.allclose(a.encode(["cat"]), c.encode(["cat"]))


def test_a_fresh_process_registers_the_tiny_config(tiny_clip, monkeypatch):
    import open_clip.factory

    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, TINY_CLIP_MODEL_NAME)
    enc = ClipTextEncoder.from_pretrained(tiny_clip[1], model_name=TINY_CLIP_MODEL_NAME)
    assert enc.encode(["cat"]).shape == (1, 32)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("width", 48, "could not load CLIP checkpoint"), ("layers", 3, "transformer.resblocks.2")],
)
def test_mismatched_architecture_is_a_checkpoint_error(tiny_clip, tmp_path, field, value, message):
    cfg = json.loads(json.dumps(TINY_CLIP_CONFIG))
    cfg["text_cfg"][field] = value
    cfg_path = tmp_path / f"omnilabel-test-clip-{field}.json"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        ClipTextEncoder.from_pretrained(tiny_clip[1], model_name=str(cfg_path))


def test_unknown_model_name_is_a_checkpoint_error(tiny_clip):
    with pytest.raises(CheckpointError, match="unknown open_clip model"):
        ClipTextEncoder.from_pretrained(tiny_clip[1], model_name="ViT-Q-99")


def test_named_checkpoint_offline_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNILABEL_CACHE", str(tmp_path))
    monkeypatch.setenv("OMNILABEL_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        ClipTextEncoder.from_pretrained("clip-vit-b-32")
    msg = str(info.value)
    assert str(tmp_path / "clip-vit-b-32" / "open_clip_pytorch_model.bin") in msg
    assert "omnilabel weights download clip-vit-b-32" in msg
