"""Write a word-level tokenizer folder for a `--load-format dummy` shape, for `tuili serve --tokenizer DIR`.

A dummy shape has no tokenizer, so the server refuses text prompts ("this model has no tokenizer"). This one
covers the shape's whole vocabulary: ids 0.. are the words `tuili bench serve` builds its prompts from (one
token per word, no BOS), every other id is a word "t<id>", none is special, so every sampled id decodes to
non-empty text and each streamed token is one text chunk (TTFT and ITL are measured per token).
usage: python scripts/make_dummy_tokenizer.py OUT_DIR SHAPE   (SHAPE: llama-3.1-8b, smollm2-135m, ...)
"""
import json
import os
import sys

from tokenizers import Tokenizer, models, pre_tokenizers

from tuili.bench.serve import WORDS
from tuili.loader.dummy import config_for_shape


def main(out_dir: str, shape: str) -> None:
    vocab_size = config_for_shape(shape).vocab_size
    words = list(dict.fromkeys(WORDS))
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"t{i}": i for i in range(len(words), vocab_size - 1)})
    vocab["<unk>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                   "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}, f)
    print(f"{out_dir}: word-level tokenizer, {vocab_size} ids, for dummy {shape}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
