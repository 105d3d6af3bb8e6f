"""Emoji images with their names, as an image-caption data set (Hugging Face imagefolder layout).

Source: the npm packages `emoji-datasource-google` (Noto Emoji images, Apache-2.0) and
`emoji-datasource-twitter` (Twemoji images, CC-BY-4.0), metadata (emoji.json) MIT, all from
iamcal/emoji-data; see train/EMOJI_NOTICE.md. Each package ships one 64x64 PNG per emoji (and per
skin-tone variation) under `img/<style>/64/` plus `emoji.json`.

- fetch: `npm pack NAME@VERSION --json` into a temporary folder (the ordinary npm client and its
  configured registry; no URL here), the tarball's sha512 checked against npm's report and against the
  pinned value below, then only `emoji.json`, the licence/readme and `img/<style>/64/` unpacked (tarfile's
  "data" filter: no absolute paths, no links out, no devices) into
  `cache_dir()/emoji/<package>-<version>/` (`$SDXS_CACHE`, else `$XDG_CACHE_HOME/sdxs` or `~/.cache/sdxs`).
  A `.complete.json` marker is written last; a cache folder with it is used offline, npm never called.
- records: every emoji with `has_img_<style>`, plus each of its skin variations with its own image.
- captions (`build_caption`): "an emoji of <name>, <short names>, category <category>, subcategory
  <subcategory>, <style> style[, <tone> skin tone]", lower case, short names with "_" -> " ", short
  names equal to the name dropped; e.g. "an emoji of grinning face, grinning, category smileys &
  emotion, subcategory face-smiling, google style".
- images: RGBA composited on white, RGB, 64x64 (resized with LANCZOS only if a package ever ships
  another size).
- split (`split_of`): val when the first 8 bytes of sha256(<base emoji's unified code points>), as a
  fraction of 2**64, fall below `val_fraction`. The key is the base emoji (not the skin variation), so
  an emoji, all its skin tones and both styles land in the same split, the same on every run and machine.
- output: OUT/train/*.png + OUT/train/metadata.jsonl ({"file_name", "text", "style", "unified",
  "category", "subcategory", "name", "skin_tone"}), the same for OUT/val, plus OUT/NOTICE.md. This
  is what `train/common.py:read_sources(image_folder=OUT/train, caption_column="text")` reads.

    python train/emoji_data.py --out data/emoji [--styles google,twitter] [--val_fraction 0.05] [--limit N]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `sdxs` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NPM_VERSION = "16.0.0"
# style -> (npm package, pinned version, the tarball's sha512 integrity as the registry publishes it)
PACKAGES = {
    "google": ("emoji-datasource-google", NPM_VERSION,
               "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "twitter": ("emoji-datasource-twitter", NPM_VERSION,
                "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
}
STYLES = tuple(PACKAGES)
IMAGE_SIZE = 64
MARKER = ".complete.json"
KEEP_FILES = ("emoji.json", "LICENSE", "README.md", "package.json")
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
NOTICE = Path(__file__).with_name("EMOJI_NOTICE.md")


class EmojiDataError(RuntimeError):
    """A fetch or cache problem, with a message meant for the user (the CLI prints it, no traceback)."""


@dataclass(frozen=True)
class EmojiImage:
    """One image of one style: a base emoji or one of its skin variations."""

    style: str
    image: str  # file name inside img/<style>/64/
    unified: str  # this image's code points (e.g. "1F385-1F3FB")
    base_unified: str  # the base emoji's code points (the split key)
    name: str
    short_names: tuple[str, ...]
    category: str
    subcategory: str
    skin_tone: str | None  # "1F3FB", "1F3FB-1F3FC", ... or None
    sort_order: int


# --- fetch and cache -------------------------------------------------------------------------------


def emoji_cache_root() -> Path:
    from sdxs.tokenizer import cache_dir

    return cache_dir() / "emoji"


def package_dir(style: str, root: Path | None = None) -> Path:
    name, version, _ = PACKAGES[style]
    return (root or emoji_cache_root()) / f"{name}-{version}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "emoji.json").is_file()


def ensure_package(style: str, root: Path | None = None, *, quiet: bool = False) -> Path:
    """The unpacked package folder of `style`, from the cache, else fetched once with npm."""
    if style not in PACKAGES:
        raise EmojiDataError(f"Unknown style {style!r}: choose from {', '.join(STYLES)}.")
    dest = package_dir(style, root)
    if is_complete(dest):
        return dest
    name, version, integrity = PACKAGES[style]
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiDataError(
            f"npm was not found, and there is no cached copy of {name}@{version} in {dest}. Install Node.js/npm "
            f"(https://nodejs.org), or copy a cache folder made on another machine to {dest} "
            f"(or point SDXS_CACHE at a folder holding emoji/{dest.name}/).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="npm-pack-", dir=dest.parent) as tmp:
        tarball = _npm_pack(npm, f"{name}@{version}", Path(tmp), quiet=quiet)
        digest = "sha512-" + base64.b64encode(_sha512(tarball)).decode()
        if digest != integrity:
            raise EmojiDataError(f"{tarball.name}: sha512 {digest} differs from the pinned {integrity}; not using it.")
        staging = Path(tmp) / "unpacked"
        _safe_extract(tarball, staging, style)
        count = verify_folder(staging, style)
        (staging / MARKER).write_text(json.dumps({"package": name, "version": version, "integrity": integrity,
                                                  "images": count}, indent=1) + "\n")
        if dest.exists():  # an incomplete earlier attempt
            shutil.rmtree(dest)
        os.replace(staging, dest)
    return dest


def _npm_pack(npm: str, spec: str, tmp: Path, *, quiet: bool) -> Path:
    if not quiet:
        print(f"fetching {spec} with npm pack ...", file=sys.stderr)
    cmd = [npm, "pack", spec, "--json", "--pack-destination", str(tmp)]
    try:
        proc = subprocess.run(cmd, check=False, cwd=tmp, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EmojiDataError(f"`npm pack {spec}` could not run ({err}). Install Node.js/npm, or copy a cache folder "
                             f"(see train/emoji_data.py) into {emoji_cache_root()}.") from None
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.strip().splitlines() if "Unknown user config" not in line)[-600:]
        raise EmojiDataError(
            f"`npm pack {spec}` failed (exit {proc.returncode}); is the npm registry reachable?\n{tail}\n"
            f"Fix the network/npm configuration, or copy a cache folder made on another machine into "
            f"{emoji_cache_root()} (or set SDXS_CACHE).")
    try:
        report = json.loads(proc.stdout[proc.stdout.index("["):])[0]
        tarball = tmp / report["filename"]
        reported = report["integrity"]
    except (ValueError, KeyError, IndexError):
        raise EmojiDataError(f"`npm pack {spec} --json` printed no report we understand: {proc.stdout[:300]!r}") from None
    if not tarball.is_file():
        raise EmojiDataError(f"`npm pack {spec}` reported {tarball.name}, but wrote no such file.")
    digest = "sha512-" + base64.b64encode(_sha512(tarball)).decode()
    if digest != reported:
        raise EmojiDataError(f"{tarball.name}: sha512 {digest} differs from npm's report {reported}: corrupt download.")
    return tarball


def _sha512(path: Path) -> bytes:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def _safe_extract(tarball: Path, dest: Path, style: str) -> None:
    """Unpack the metadata and img/<style>/64/ (not the sprite sheets) from npm's `package/` prefix."""
    wanted_dir = f"package/img/{style}/{IMAGE_SIZE}/"
    keep = {f"package/{f}" for f in KEEP_FILES}
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if m.isfile() and (m.name in keep or m.name.startswith(wanted_dir)):
                m.name = m.name[len("package/"):]
                if m.name.startswith("/") or ".." in Path(m.name).parts:  # also refused by the "data" filter
                    raise EmojiDataError(f"{tarball.name}: unsafe path {m.name!r} in the tarball.")
                members.append(m)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older Python: regular files only, paths checked above
            tar.extractall(dest, members=members)


def verify_folder(folder: Path, style: str) -> int:
    """emoji.json parses and every image it flags for `style` exists; returns the image count."""
    try:
        records = json.loads((folder / "emoji.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EmojiDataError(f"{folder}: emoji.json is missing or unreadable ({err}).") from None
    images = list_images(records, style)
    img_dir = folder / "img" / style / str(IMAGE_SIZE)
    missing = [e.image for e in images if not (img_dir / e.image).is_file()]
    if not images or missing:
        raise EmojiDataError(f"{folder}: {len(missing)} of {len(images)} {style} images missing, e.g. {missing[:3]}.")
    return len(images)


# --- metadata, captions, images, split -------------------------------------------------------------


def list_images(records: list[dict], style: str, limit: int | None = None) -> list[EmojiImage]:
    """The images of `style`: each emoji flagged has_img_<style>, then its skin variations with their
    own images; in sort_order. `limit` keeps the first N emoji (by sort_order), all their images."""
    flag = f"has_img_{style}"
    out = []
    ordered = sorted(records, key=lambda r: (r.get("sort_order", 0), r["unified"]))
    for r in ordered[:limit] if limit else ordered:
        common = {"style": style, "base_unified": r["unified"], "name": r.get("name") or r.get("short_name") or r["unified"],
                  "short_names": tuple(r.get("short_names") or ()), "category": r.get("category") or "",
                  "subcategory": r.get("subcategory") or "", "sort_order": r.get("sort_order", 0)}
        if r.get(flag):
            out.append(EmojiImage(image=r["image"], unified=r["unified"], skin_tone=None, **common))
        for tone, v in sorted((r.get("skin_variations") or {}).items()):
            if v.get(flag):
                out.append(EmojiImage(image=v["image"], unified=v["unified"], skin_tone=tone, **common))
    return out


def skin_tone_words(tone: str | None) -> str | None:
    """'1F3FB' -> 'light skin tone'; '1F3FB-1F3FF' -> 'light and dark skin tones'; same tone twice -> once."""
    if not tone:
        return None
    words = [SKIN_TONES.get(t.upper(), t.lower()) for t in tone.split("-")]
    words = list(dict.fromkeys(words))
    return f"{words[0]} skin tone" if len(words) == 1 else f"{' and '.join(words)} skin tones"


def build_caption(record: dict | EmojiImage, style: str, skin_tone: str | None = None) -> str:
    """The caption of one image, from emoji.json fields (a record dict or an EmojiImage).

    "an emoji of <name>, <short names>, category <category>, subcategory <subcategory>, <style> style
    [, <tone> skin tone(s)]": all lower case; short names with "_" -> " ", those equal to the name (or
    repeated) dropped; empty parts left out. `skin_tone` is a skin_variations key ("1F3FB",
    "1F3FB-1F3FF"); for an EmojiImage its own skin_tone is used when none is given."""
    if isinstance(record, EmojiImage):
        skin_tone = skin_tone or record.skin_tone
        name, short_names, category, subcategory = record.name, record.short_names, record.category, record.subcategory
    else:
        name = record.get("name") or record.get("short_name") or record.get("unified", "")
        short_names, category, subcategory = record.get("short_names") or (), record.get("category"), record.get("subcategory")
    name = " ".join(name.lower().split())
    shorts = [s.replace("_", " ").lower() for s in short_names]
    shorts = [s for s in dict.fromkeys(shorts) if s and s != name]
    parts = [f"an emoji of {name}"]
    if shorts:
        parts.append(", ".join(shorts))
    if category:
        parts.append(f"category {category.lower()}")
    if subcategory:
        parts.append(f"subcategory {subcategory.lower()}")
    parts.append(f"{style} style")
    tone = skin_tone_words(skin_tone)
    if tone:
        parts.append(tone)
    return ", ".join(parts)


def load_rgb(path: Path, size: int = IMAGE_SIZE):
    """The PNG alpha-composited on white, as an RGB PIL image of size x size."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def split_of(unified: str, val_fraction: float = 0.05) -> str:
    """'val' or 'train', from a stable hash of the (base) emoji's unified code points."""
    h = int.from_bytes(hashlib.sha256(unified.upper().encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


# --- the imagefolder output ------------------------------------------------------------------------


def write_imagefolder(out: Path, package_dirs: dict[str, Path], *, val_fraction: float = 0.05,
                      limit: int | None = None, progress: bool = True) -> dict:
    """Write OUT/{train,val}/ (PNGs + metadata.jsonl) from unpacked package folders; returns counts."""
    from tqdm.auto import tqdm

    items = []
    for style, folder in package_dirs.items():
        records = json.loads((folder / "emoji.json").read_text(encoding="utf-8"))
        items += [(folder, e) for e in list_images(records, style, limit)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = {s: Path(tempfile.mkdtemp(prefix=f".{s}-", dir=out)) for s in ("train", "val")}
    lines = {"train": [], "val": []}
    counts = {"styles": {s: 0 for s in package_dirs}, "train": 0, "val": 0}
    try:
        for folder, e in tqdm(items, desc="emoji images", unit="img", disable=not progress):
            split = split_of(e.base_unified, val_fraction)
            file_name = f"{e.style}_{Path(e.image).stem}.png"
            load_rgb(folder / "img" / e.style / str(IMAGE_SIZE) / e.image).save(staging[split] / file_name, optimize=False)
            lines[split].append({"file_name": file_name, "text": build_caption(e, e.style), "style": e.style,
                                 "unified": e.unified, "category": e.category, "subcategory": e.subcategory,
                                 "name": e.name, "skin_tone": e.skin_tone})
            counts["styles"][e.style] += 1
            counts[split] += 1
        for split, folder in staging.items():
            (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines[split]),
                                                   encoding="utf-8")
            final = out / split
            if final.exists():
                if not (final / "metadata.jsonl").is_file():
                    raise EmojiDataError(f"{final} exists and is not an imagefolder written here; not replacing it.")
                shutil.rmtree(final)
            os.replace(folder, final)
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
    if NOTICE.is_file():
        shutil.copyfile(NOTICE, out / "NOTICE.md")
    return counts


def build_dataset(out: Path, styles=STYLES, *, val_fraction: float = 0.05, limit: int | None = None,
                  cache_root: Path | None = None, progress: bool = True) -> dict:
    dirs = {s: ensure_package(s, cache_root, quiet=not progress) for s in styles}
    return write_imagefolder(out, dirs, val_fraction=val_fraction, limit=limit, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Licences: see train/EMOJI_NOTICE.md (copied to OUT/NOTICE.md).")
    parser.add_argument("--out", required=True, type=Path, help="output folder: OUT/train and OUT/val imagefolders")
    parser.add_argument("--styles", default=",".join(STYLES), help=f"comma-separated, from {', '.join(STYLES)} (default: all)")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="fraction of emoji in val (default 0.05)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N emoji (by sort order) per style")
    parser.add_argument("--cache_root", type=Path, default=None, help="package cache (default: $SDXS_CACHE/emoji or ~/.cache/sdxs/emoji)")
    args = parser.parse_args(argv)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    if not styles or any(s not in PACKAGES for s in styles):
        parser.error(f"--styles: choose from {', '.join(STYLES)}")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val_fraction must be in [0, 1)")
    start = time.perf_counter()
    try:
        counts = build_dataset(args.out, styles, val_fraction=args.val_fraction, limit=args.limit, cache_root=args.cache_root)
    except EmojiDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_style = ", ".join(f"{s}: {n}" for s, n in counts["styles"].items())
    print(f"{counts['train'] + counts['val']} images ({per_style}); train {counts['train']}, val {counts['val']} "
          f"-> {args.out}/train, {args.out}/val ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
