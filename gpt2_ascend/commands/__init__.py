"""The command-line programs, installed as console scripts (setup.cfg) and run from a checkout by the thin
train.py / evaluate.py / generate.py / convert/*.py at the repository root:

    gpt2-train       train or finetune from a recipe (a YAML file, or a packaged recipe's name)
    gpt2-evaluate    perplexity or text-classification accuracy
    gpt2-generate    sampling / greedy decoding, streamed
    gpt2-convert     hf-to-mindspore | mindspore-to-hf | merge-hf-shards | merge-lora | merge-checkpoint
    gpt2-prepare     wikitext2 (also plain .txt) | txtcls
"""
