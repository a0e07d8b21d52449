"""The shape twin has Llama 3.2 1B's exact configuration and parameter count (built on the meta device)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cart_intent.models import SHAPE_TWINS, model_slug


def test_llama_1b_twin_matches_the_real_shape():
    shape = SHAPE_TWINS["shape:llama-3.2-1b"]
    config = LlamaConfig(**shape)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 16, 32)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (8, 64, 8192)
    assert config.vocab_size == 128256 and config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 500000.0
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    assert params == 1_235_814_400  # Llama 3.2 1B: 1.24 B, tied embeddings counted once
    assert abs(params * 2 / 1e9 - 2.47) < 0.01  # F16 bytes ~ its 2.47 GB GGUF


def test_model_slugs():
    assert model_slug("meta-llama/Llama-3.2-1B") == "llama-3.2-1b"
    assert model_slug("shape:llama-3.2-1b") == "llama-3.2-1b-shape"
    assert model_slug("tiny") == "tiny"
