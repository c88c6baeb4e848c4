"""gpt2_ascend.eval: perplexity protocols against transformers' own loss, and classification accuracy."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import hf_model, ours_from_hf, tiny_config
from gpt2_ascend.eval import classification_accuracy, perplexity

SEQ = 16


@pytest.fixture(scope="module")
def models():
    config = tiny_config()
    hf = hf_model(config, seed=3)
    return ours_from_hf(hf, config), hf


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 511, (7 * SEQ + 5,), generator=g)  # 7 blocks and a partial one


def hf_block_losses(hf, blocks, batch_size):
    """transformers' mean loss of each batch of blocks (labels = inputs, shifted inside HF)."""
    with torch.no_grad():
        return [hf(input_ids=blocks[i:i + batch_size], labels=blocks[i:i + batch_size]).loss.item()
                for i in range(0, blocks.size(0), batch_size)]


def rel(a, b):
    return abs(a - b) / abs(b)


def test_token_protocol_matches_transformers_loss(models, stream):
    ours, hf = models
    blocks = stream[: 7 * SEQ].view(7, SEQ)
    per_block = hf_block_losses(hf, blocks, 1)
    expected = sum(per_block) / len(per_block)  # equal token counts per block -> mean of block means
    got = perplexity(ours, stream, SEQ, batch_size=3)
    assert got["tokens"] == 7 * (SEQ - 1)
    assert got["blocks"] == 7
    assert rel(got["loss"], expected) < 1e-6
    assert rel(got["ppl"], math.exp(expected)) < 1e-6
    # 2-D blocks give the same number, batch size does not matter
    again = perplexity(ours, blocks.numpy(), SEQ, batch_size=7)
    assert rel(again["loss"], got["loss"]) < 1e-6


def test_mindformers_protocol_is_mean_of_batch_means(models, stream):
    ours, hf = models
    blocks = stream[: 7 * SEQ].view(7, SEQ)
    batch_means = hf_block_losses(hf, blocks, 3)  # batches of 3, 3, 1 blocks
    expected = sum(batch_means) / len(batch_means)
    got = perplexity(ours, stream, SEQ, batch_size=3, protocol="mindformers")
    assert rel(got["loss"], expected) < 1e-6
    assert rel(got["ppl"], math.exp(expected)) < 1e-6
    token = perplexity(ours, stream, SEQ, batch_size=3)
    assert abs(got["loss"] - token["loss"]) > 1e-6  # the uneven last batch makes them differ


def guide_nll(logits_of, stream, stride):
    """(summed NLL, tokens scored) by HF's perplexity guide (windows of SEQ tokens every `stride`, each scoring the
    tokens after the previous window's end), with an exact per-token count. logits_of: a (1, T) window -> logits."""
    ids = stream[None]
    n = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + SEQ, n)
            trg_len = end - prev_end
            window = ids[:, begin:end]
            target = window.clone()
            target[:, :-trg_len] = -100
            scored = int((target[:, 1:] != -100).sum())
            if scored:
                logits = logits_of(window)[0, :-1].double()
                nll_sum += torch.nn.functional.cross_entropy(logits, target[0, 1:], reduction="sum").item()
                n_tokens += scored
            prev_end = end
            if end == n:
                break
    return nll_sum, n_tokens


class ContextCounter(torch.nn.Module):
    """A causal LM over a stream that counts up (token t + 1 follows token t): its logit for the next token is
    0.5 x the tokens before it in the window, every other logit 0. A token's loss says how much context its window
    gave it (one token more or less: ~0.1), where a random GPT-2's losses hardly depend on context."""
    vocab = 64

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where perplexity() looks for the device

    def forward(self, input_ids):
        B, T = input_ids.shape
        confidence = 0.5 * torch.arange(T, dtype=torch.float32).expand(B, T)
        logits = torch.zeros(B, T, self.vocab).scatter(2, ((input_ids + 1) % self.vocab)[..., None],
                                                       confidence[..., None])
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("stride", [1, 5, SEQ - 1, SEQ])
def test_stride_gives_each_token_the_context_of_hf_sliding_window(stream, stride):
    counter = ContextCounter()
    counting = torch.arange(stream.numel()) % counter.vocab
    nll_sum, n_tokens = guide_nll(lambda window: counter(window).logits, counting, stride)
    got = perplexity(counter, counting, SEQ, batch_size=4, stride=stride)
    assert got["tokens"] == n_tokens
    assert rel(got["loss"], nll_sum / n_tokens) < 1e-6


@pytest.mark.parametrize("stride", [5, SEQ])
def test_stride_matches_hf_sliding_window_per_token(models, stream, stride):
    ours, hf = models
    n = stream.numel()
    nll_sum, n_tokens = guide_nll(lambda window: hf(input_ids=window).logits, stream, stride)
    got = perplexity(ours, stream, SEQ, batch_size=4, stride=stride)
    assert got["protocol"] == "stride"
    assert rel(got["loss"], nll_sum / n_tokens) < 1e-6
    assert got["tokens"] == n_tokens
    if stride < SEQ:
        assert got["tokens"] == n - 1  # every token but the first is scored once


def test_perplexity_restores_training_mode_and_rejects_bad_input(models, stream):
    ours, _ = models
    ours.train()
    perplexity(ours, stream, SEQ)
    assert ours.training
    ours.eval()
    with pytest.raises(ValueError, match="protocol"):
        perplexity(ours, stream, SEQ, protocol="nope")
    with pytest.raises(ValueError, match="wide but seq_length"):
        perplexity(ours, stream[:32].view(2, 16), 8)
    with pytest.raises(ValueError, match="n_positions"):
        perplexity(ours, stream, 65)
    with pytest.raises(ValueError, match="stride"):
        perplexity(ours, stream, SEQ, stride=SEQ + 1)
    with pytest.raises(ValueError, match="another tokenizer"):
        perplexity(ours, torch.full((40,), 600), SEQ)
    with pytest.raises(ValueError, match="fewer than one block"):
        perplexity(ours, stream[:10], SEQ)


def classifier_data(n=23, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 511)  # right padding with the pad/eos id, as txtcls writes it
    labels = torch.randint(0, 2, (n,), generator=g)
    return dict(input_ids=ids.numpy(), attention_mask=mask.numpy(), labels=labels.numpy())


def test_classification_accuracy_matches_transformers_predictions():
    config = tiny_config()
    hf = hf_model(config, kind="cls", seed=5)
    ours = ours_from_hf(hf, config, kind="cls")
    data = classifier_data()
    with torch.no_grad():
        hf_logits = hf(input_ids=torch.as_tensor(data["input_ids"]),
                       attention_mask=torch.as_tensor(data["attention_mask"])).logits
    predicted = hf_logits.argmax(-1).numpy()
    labels = data["labels"]
    got = classification_accuracy(ours, data, batch_size=5)
    assert got["total"] == 23
    assert got["correct"] == int((predicted == labels).sum())
    assert got["accuracy"] == got["correct"] / 23
    for c in (0, 1):
        assert got["per_class"][c]["total"] == int((labels == c).sum())
        assert got["per_class"][c]["correct"] == int(((predicted == labels) & (labels == c)).sum())
    expected_loss = torch.nn.functional.cross_entropy(hf_logits, torch.as_tensor(labels)).item()
    assert abs(got["loss"] - expected_loss) < 1e-5


def test_evaluation_turns_dropout_off_and_gives_the_model_back_training(stream):
    """Models in training mode with the recipes' dropout 0.1 (as a trainer hands them to its evaluation): every
    protocol and the accuracy give the numbers of the same model in eval mode, exactly (one process), call after
    call, and the models come back in training mode."""
    config = tiny_config(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    lm = ours_from_hf(hf_model(config, seed=3), config)
    classifier = ours_from_hf(hf_model(config, kind="cls", seed=5), config, kind="cls")
    data = classifier_data()
    runs = [lambda: perplexity(lm, stream, SEQ, batch_size=3), lambda: perplexity(lm, stream, SEQ, stride=5),
            lambda: perplexity(lm, stream, SEQ, batch_size=3, protocol="mindformers"),
            lambda: classification_accuracy(classifier, data, batch_size=5)]
    lm.eval(), classifier.eval()
    without_dropout = [run() for run in runs]
    lm.train(), classifier.train()
    for _ in range(2):
        assert [run() for run in runs] == without_dropout
    assert lm.training and classifier.training


def test_classification_accuracy_rejects_bad_data():
    model = ours_from_hf(hf_model(tiny_config(), kind="cls"), tiny_config(), kind="cls")
    data = classifier_data()
    with pytest.raises(ValueError, match="labels"):
        classification_accuracy(model, {"input_ids": data["input_ids"]})
    with pytest.raises(ValueError, match="one per example"):
        classification_accuracy(model, dict(data, labels=data["labels"][:3]))
    with pytest.raises(ValueError, match="num_labels"):
        classification_accuracy(model, dict(data, labels=np.full_like(data["labels"], 4)))
