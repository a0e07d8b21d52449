"""The fine-tuning loss: computing the shared instruction once per batch gives the full sequences' loss and
gradients; labels cover the completion only; the shared prefix never eats a prompt's last token."""
import pytest
import torch

from cart_intent.training import IGNORE, Collate, common_prefix_len, completion_loss


@pytest.fixture(scope="module")
def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj",
                                                                                                 "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so their gradients through the prefix matter
            param.data.normal_(0, 0.05)
    return model


def examples():
    prefix = [1, 7, 8, 9, 10, 11]
    bodies = [([12, 13], [20, 21, 2]), ([14], [22, 2]), ([15, 16, 17, 18], [23, 24, 25, 2])]
    return [{"input_ids": prefix + prompt + answer, "prompt_len": len(prefix) + len(prompt)} for prompt, answer in bodies]


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_shared_prefix_equals_full_sequences(lora_model):
    rows = examples()
    prefix_len = common_prefix_len(rows)
    assert prefix_len == 6
    full, shared = Collate(0)(rows), Collate(0, prefix_len)(rows)
    assert shared["prefix_ids"].tolist() == [rows[0]["input_ids"][:6]] and shared["input_ids"].shape[1] == 8
    reference = lora_model(**full).loss  # the model's own loss over the same labels
    full_loss, shared_loss = completion_loss(lora_model, full), completion_loss(lora_model, shared)
    assert torch.allclose(full_loss, reference, atol=1e-6) and torch.allclose(shared_loss, reference, atol=1e-5)
    expected, got = gradients(lora_model, reference), gradients(lora_model, completion_loss(lora_model, shared))
    assert expected.abs().sum() > 0 and torch.allclose(got, expected, atol=1e-6, rtol=1e-4)


def test_labels_are_the_completion_only():
    rows = examples()
    batch = Collate(0)(rows)
    for row, labels, mask in zip(rows, batch["labels"].tolist(), batch["attention_mask"].tolist()):
        kept = [label for label in labels if label != IGNORE]
        assert kept == row["input_ids"][row["prompt_len"]:] and sum(mask) == len(row["input_ids"])


def test_prefix_leaves_every_prompt_a_token():
    rows = [{"input_ids": [1, 2, 3, 9], "prompt_len": 3}, {"input_ids": [1, 2, 3, 4, 9], "prompt_len": 4}]
    assert common_prefix_len(rows) == 2
    assert common_prefix_len([{"input_ids": [5, 9], "prompt_len": 1}, {"input_ids": [6, 9], "prompt_len": 1}]) == 0
