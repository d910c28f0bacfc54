"""random_weights.py: a model folder of another architecture's shapes over a like folder's tokenizer files."""

from __future__ import annotations

import json

import pytest
from benchscripts import benchmark_script
from tiny import tiny_config


@pytest.fixture(scope="module")
def rw():
    with benchmark_script("random_weights") as module:
        yield module


def test_shapes_replace_the_config_keys_and_the_weights_follow_them(rw, tmp_path):
    like = tmp_path / "like"
    like.mkdir()
    tiny_config("llama").save_pretrained(like)
    (like / "tokenizer.json").write_text("{}")
    (like / "model.safetensors").write_bytes(b"not copied")
    shapes = tmp_path / "shapes.json"
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 48}
    shapes.write_text(json.dumps(qwen2 | {"num_hidden_layers": 3, "intermediate_size": 80, "head_dim": 12}))
    out = rw.build(like, tmp_path / "out", seed=1, shapes=shapes)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("qwen2", 48, 3)
    assert config["vocab_size"] == 96  # kept from the like folder, whose tokenizer it goes with
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "random_weights.json").read_text())["shapes"] == "shapes.json"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").shape == (48, 80)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").shape == (48,)  # qwen2's q,k,v bias
    assert not any(".layers.3." in n for n in names)


def test_shapes_must_be_an_object(rw, tmp_path):
    like = tmp_path / "like"
    like.mkdir()
    tiny_config("llama").save_pretrained(like)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="bad.json: expected a JSON object"):
        rw.build(like, tmp_path / "out", shapes=bad)
