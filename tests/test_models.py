import pytest
import torch

import memfit
from memfit.errors import ModelNotFoundError


def test_tiny_models_are_seeded_and_deterministic():
    a, _ = memfit.load("tiny-llama")
    b, _ = memfit.load("tiny-llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_tiny_qwen2_has_biases_and_an_untied_head():
    model, tokenizer = memfit.load("tiny-qwen2")
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert tokenizer("hé")["input_ids"] == [104, 195, 169]


def test_hugging_face_directory_loads(tmp_path):
    model, tokenizer = memfit.load("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, _ = memfit.load(str(tmp_path))
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("ref", ["/no/such/dir", "./relative-missing", "missing.gguf"])
def test_missing_model_names_what_is_accepted(ref):
    with pytest.raises(ModelNotFoundError, match=r"not found.*'demo', or one of tiny-llama, tiny-qwen2"):
        memfit.load(ref)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        memfit.load(str(tmp_path))


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"1234")
    with pytest.raises(ModelNotFoundError, match="is a file but not a .gguf"):
        memfit.load(str(path))


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 32)
    with pytest.raises(ModelNotFoundError, match="cannot read GGUF file"):
        memfit.load(str(path))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="could not be fetched from the hub"):
        memfit.load("nobody-here/no-such-model")
