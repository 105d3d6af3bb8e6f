"""The real CLIP BPE tokenizer, built offline.

CLIP's byte-level BPE vocabulary (`bpe_simple_vocab_16e6.txt.gz`, MIT, OpenAI) ships inside the
`open_clip_torch` wheel. We never install that package (its dependencies pull a CUDA torch): we read
the file from an installed copy, from our cache, or from the wheel fetched with `pip download
--no-deps`, and turn it into the `vocab.json` + `merges.txt` that transformers' CLIPTokenizer reads.
The result has the 49,408 tokens of every SD text encoder ("a photo of a cat" ->
[49406, 320, 1125, 539, 320, 2368, 49407]).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894: byte tokens, byte</w> tokens and 2 specials aside


def cache_dir() -> Path:
    root = os.environ.get("SDXS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxs"
    return Path(root)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table: printable bytes map to themselves, the other
    bytes to code points from 256 on. The ORDER matters: printable bytes first, as CLIP lists them,
    since it fixes the token ids ('a</w>' is 320)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def find_bpe_file() -> Path:
    """Locate CLIP's BPE merges file: $SDXS_CLIP_BPE, an installed open_clip, our cache, or pip."""
    if os.environ.get("SDXS_CLIP_BPE"):
        path = Path(os.environ["SDXS_CLIP_BPE"])
        if not path.is_file():
            raise FileNotFoundError(f"SDXS_CLIP_BPE points at {path}, which is not a file.")
        return path
    try:  # an installed open_clip (import only its location: the package itself imports torchvision)
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        if spec and spec.submodule_search_locations:
            candidate = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
            if candidate.is_file():
                return candidate
    except (ImportError, ValueError):
        pass
    cached = cache_dir() / BPE_FILE
    if cached.is_file():
        return cached
    return _fetch_bpe_file(cached)


def _fetch_bpe_file(dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, OPEN_CLIP_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"Could not get CLIP's BPE vocabulary: `{' '.join(cmd[2:])}` failed "
                f"({proc.stderr.strip()[-300:] or 'no wheel'}). Connect to the package index once, or "
                f"set SDXS_CLIP_BPE to a copy of {BPE_FILE} (it ships inside the open_clip_torch wheel)."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(f"open_clip/{BPE_FILE}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".part")
    tmp_dest.write_bytes(data)
    tmp_dest.replace(dest)
    return dest


def clip_vocab_and_merges(bpe_file: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary in CLIP's own order: bytes, bytes + '</w>', one token per merge, specials."""
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + N_MERGES]  # line 0 is a version header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(dest: str | Path, model_max_length: int = 77) -> Path:
    """Write a tokenizer folder in the layout SD checkpoints ship (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json), which CLIPTokenizer.from_pretrained reads."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(find_bpe_file())
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True, **specials}
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (dest / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return dest


def cached_clip_tokenizer_dir() -> Path:
    """A ready tokenizer folder in the cache, built on first use."""
    dest = cache_dir() / "clip-tokenizer"
    if not (dest / "tokenizer_config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=cache_dir().mkdir(parents=True, exist_ok=True) or cache_dir()))
        write_clip_tokenizer(tmp)
        if dest.exists():  # another process won the race
            return dest
        tmp.rename(dest)
    return dest
