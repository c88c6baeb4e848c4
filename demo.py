"""Demo: build a small GPT-2, save it in HF format, reload it with transformers and check the logits agree.

(Grows into tiny pretrain on WikiText-2 -> perplexity -> samples once the trainer lands.)
"""
import tempfile

import torch

from gpt2_ascend import GPT2Config, GPT2LMHeadModel, load_tokenizer


def main():
    torch.manual_seed(0)
    tok = load_tokenizer()
    config = GPT2Config.from_preset("tiny", vocab_size=len(tok))
    model = GPT2LMHeadModel(config).eval()
    print(f"built {config.n_layer}-layer GPT-2 with {model.num_parameters():,} parameters")
    ids = torch.tensor([tok("The meaning of life is").input_ids])
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        import transformers
        theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        with torch.no_grad():
            diff = (model(ids).logits - theirs(ids).logits).abs().max().item()
    print(f"saved, reloaded with transformers: max |logit difference| = {diff:.2e}")
    with torch.no_grad():
        for _ in range(8):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    print("greedy sample (random weights):", repr(tok.decode(ids[0])))


if __name__ == "__main__":
    main()
