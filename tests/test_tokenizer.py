import json

from transformers import CLIPTokenizer

from sdxs.tokenizer import VOCAB_SIZE, cached_clip_tokenizer_dir


def test_real_clip_tokenizer_ids():
    tok = CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir())
    assert len(tok) == VOCAB_SIZE == 49408
    # Known ids of the real CLIP tokenizer (SD-1.5 / SD-2.x text encoders).
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


def test_tokenizer_folder_layout_matches_sd_checkpoints(tiny_model_dir):
    names = sorted(p.name for p in (tiny_model_dir / "tokenizer").iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((tiny_model_dir / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["a</w>"] == 320
