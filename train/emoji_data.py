"""Emoji images with their names, as an image-caption data set (Hugging Face imagefolder layout).

Sources: npm packages, each pinned to a version and its tarball's sha512 (licences, attributions and
the packages left out, with why: train/EMOJI_NOTICE.md, copied to OUT/NOTICE.md). A *style* is one
source's drawing of the emoji and is named in every caption:

  style                 npm package (version)            what it ships
  google, twitter       emoji-datasource-google/-twitter  64x64 PNGs + emoji.json (names, categories, skin
                        (16.0.0)                          variations); the 64 px set the bundled v1 models learnt
  noto                  @svgmoji/noto (3.2.0)             sprites/all.svg: a nested <svg id="<code points>"> per emoji
  twemoji               @twemoji/svg (15.0.0)             one SVG per emoji, named by its code points ("1f385-1f3fb.svg")
  fluent-color, -flat,  fluentui-emoji (1.3.0)            one SVG per emoji in icons/modern, icons/flat,
  fluent-high-contrast                                    icons/high-contrast, named by its CLDR name ("santa-claus-light.svg")
  (names only)          emojibase-data (17.0.0)           en/data.json: CLDR names with their code points

- sizes (`--image_size`): 64 (the default) makes the google+twitter set exactly as before this option
  existed. Any other size (128 for teacher v2) takes the SVG styles, rendered at that size with resvg
  (resvg-py; fit in the square, centred, system fonts not loaded so the pixels are the same on every
  machine). The 64 px PNG sets are refused at other sizes: upscaled they would teach the teacher blur,
  and the same two designs come as vectors (noto is Google's Noto Emoji, twemoji is Twitter's Twemoji).
- fetch: `npm pack NAME@VERSION --json` into a temporary folder (the ordinary npm client and its
  configured registry; no URL here), the tarball's sha512 checked against npm's report and against the
  pinned value below, then only the files in UNPACK (tarfile's "data" filter: no absolute paths, no links
  out, no devices) into `cache_dir()/emoji/<package>-<version>/` (`$SDXS_CACHE`, else
  `$XDG_CACHE_HOME/sdxs` or `~/.cache/sdxs`). A `.complete.json` marker is written last; a cache folder
  with it is used offline, npm never called.
- names: every image is named from emoji-datasource's emoji.json (the google package), matched by code
  points (upper case, 4+ hex digits, the variation selector FE0F dropped), so one emoji has the same
  name, short names, category and split in every style. Code points emoji.json lacks: a skin-tone
  variant of an emoji it has takes that emoji's name and the tone; else emojibase's CLDR label (no
  short names, no category); else the image is skipped, counted as "no name". fluentui-emoji's file
  names are matched to code points through emojibase's labels, then emoji.json's names and short names;
  a file name that matches none is skipped, counted as "name not matched".
- captions (`build_caption`): "an emoji of <name>, <short names>, category <category>, subcategory
  <subcategory>, <style words> style[, <tone> skin tone]", lower case, short names with "_" -> " ", short
  names equal to the name dropped; the style words are the style with "-" -> " " ("fluent color");
  e.g. "an emoji of grinning face, grinning, category smileys & emotion, subcategory face-smiling,
  google style".
- images: RGBA composited on white, RGB, size x size. PNGs resized with LANCZOS only if a package ever
  ships another size. Anything unreadable (a missing file, a PNG or SVG that does not decode, an SVG
  that draws nothing) is skipped and counted per style and reason, as are duplicates of one emoji.
- split (`split_of`): val when the first 8 bytes of sha256(<base emoji's unified code points, as in
  emoji.json>), as a fraction of 2**64, fall below `val_fraction`. The key is the base emoji (not the
  skin variation, not the file name), so an emoji, all its skin tones and all styles land in the same
  split, the same on every run and machine.
- output: OUT/train/*.png + OUT/train/metadata.jsonl ({"file_name", "text", "style", "unified",
  "category", "subcategory", "name", "skin_tone"}), the same for OUT/val, plus OUT/NOTICE.md and, for
  the SVG styles, OUT/cldr_names.json (`write_cldr_names`: the CLDR names of emoji whose emoji.json name
  differs, e.g. "red heart", for the apps' prompt lookup; not read by training). This
  is what `train/common.py:read_sources(image_folder=OUT/train, caption_column="text")` reads. The
  command prints the images per style and split and the skipped counts.

    python train/emoji_data.py --out data/emoji [--styles google,twitter] [--val_fraction 0.05] [--limit N]
    python train/emoji_data.py --out data/emoji128 --image_size 128 \\
        [--styles noto,twemoji,fluent-color,fluent-flat,fluent-high-contrast]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `sdxs` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NPM_VERSION = "16.0.0"
# package key -> (npm package, pinned version, the tarball's sha512 integrity as the registry publishes it)
PACKAGES = {
    "google": ("emoji-datasource-google", NPM_VERSION,
               "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "twitter": ("emoji-datasource-twitter", NPM_VERSION,
                "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
    "noto": ("@svgmoji/noto", "3.2.0",
             "sha512-JgtNciB06hMDI1Pb1N2IgLh44XRMZUUNwBANzjY5jXTPqOCu1A1VA35ENvUsRhEUZOm8I+hbdAEHkwMVqxLeIQ=="),
    "twemoji": ("@twemoji/svg", "15.0.0",
                "sha512-ZSPef2B6nBaYnfgdTbAy4jgW95o7pi2xPGwGCU+WMTxo7J6B1lMPTWwSq/wTuiMq+N0khQ90CcvYp1wFoQpo/w=="),
    "fluent": ("fluentui-emoji", "1.3.0",
               "sha512-JTXXwqIie2rWTgOkIJDJxr0WtwTz2WU4kdOq8buLVThYwQ264aFR2jdTyuon2oEbLqqGMT64zI4btyn1saB2xw=="),
    "emojibase": ("emojibase-data", "17.0.0",
                  "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA=="),
}
KEEP_FILES = ("emoji.json", "LICENSE", "README.md", "package.json")
# package key -> what is unpacked from it: "dir/" a folder, "*.svg" the top-level files matching, else
# one file. The first entry must be there for the cache folder to count as complete.
UNPACK = {
    "google": ("emoji.json", "img/google/64/", *KEEP_FILES[1:]),
    "twitter": ("emoji.json", "img/twitter/64/", *KEEP_FILES[1:]),
    "noto": ("sprites/all.svg", "LICENSE", "readme.md", "package.json"),
    "twemoji": ("package.json", "*.svg", "license", "readme.md"),
    "fluent": ("icons/", "LICENSE", "README.md", "package.json"),
    "emojibase": ("en/data.json", "LICENSE", "README.md", "package.json"),
}
NAMES_PACKAGE, LABELS_PACKAGE = "google", "emojibase"  # emoji.json (names), emojibase (CLDR labels)


@dataclass(frozen=True)
class StyleSource:
    """Where one style's images are: a package, how it lays them out, and the folder (or sprite file)."""

    package: str  # a PACKAGES key
    kind: str  # "png": emoji.json + PNGs; "sprite": one SVG of nested <svg id=code points>;
    #            "svg_by_code": SVG files named by code points; "svg_by_name": SVG files named by CLDR name
    images: str  # inside the unpacked package


STYLE_SOURCES = {
    "google": StyleSource("google", "png", "img/google/64"),
    "twitter": StyleSource("twitter", "png", "img/twitter/64"),
    "noto": StyleSource("noto", "sprite", "sprites/all.svg"),
    "twemoji": StyleSource("twemoji", "svg_by_code", "."),
    "fluent-color": StyleSource("fluent", "svg_by_name", "icons/modern"),
    "fluent-flat": StyleSource("fluent", "svg_by_name", "icons/flat"),
    "fluent-high-contrast": StyleSource("fluent", "svg_by_name", "icons/high-contrast"),
}
STYLES = ("google", "twitter")  # the 64 px PNG set: the default at --image_size 64
SVG_STYLES = tuple(s for s, src in STYLE_SOURCES.items() if src.kind != "png")  # the default at other sizes
ALL_STYLES = STYLES + SVG_STYLES
IMAGE_SIZE = 64  # the PNG sets' native size, and the default --image_size
MARKER = ".complete.json"
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
# fluentui-emoji's names that differ from CLDR's in a regular way, tried in turn when a name matches no label:
# "person-elf" is CLDR's "elf", "man-blonde-hair" its "man: blond hair"
FLUENT_RENAMES = ((r"^person-", ""), (r"blonde", "blond"))
NOTICE = Path(__file__).with_name("EMOJI_NOTICE.md")
CLDR_NAMES = "cldr_names.json"  # OUT/cldr_names.json (the SVG sets): the names phones show, for the apps' prompt lookup
SVG_NS = "http://www.w3.org/2000/svg"


class EmojiDataError(RuntimeError):
    """A fetch or cache problem, with a message meant for the user (the CLI prints it, no traceback)."""


class UnreadableImage(ValueError):
    """One image that cannot be used (skipped and counted, under `reason`)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class EmojiImage:
    """One image of one style: a base emoji or one of its skin variations."""

    style: str
    image: str  # inside the style's images folder: a file name, or for a sprite the symbol id
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


def package_dir(key: str, root: Path | None = None) -> Path:
    """The cache folder of a package: <name>-<version>, a scope's "@" dropped and "/" -> "-" as npm names tarballs."""
    name, version, _ = PACKAGES[key]
    return (root or emoji_cache_root()) / f"{name.lstrip('@').replace('/', '-')}-{version}"


def is_complete(folder: Path, key: str = "google") -> bool:
    """A finished unpack of package `key`: the marker (written last) and the package's main file are there."""
    return (folder / MARKER).is_file() and (folder / UNPACK[key][0].rstrip("/")).exists()


def ensure_package(key: str, root: Path | None = None, *, quiet: bool = False) -> Path:
    """The unpacked package folder of `key` (a PACKAGES key), from the cache, else fetched once with npm."""
    if key not in PACKAGES:
        raise EmojiDataError(f"Unknown style {key!r}: choose from {', '.join(ALL_STYLES)}.")
    dest = package_dir(key, root)
    if is_complete(dest, key):
        return dest
    name, version, integrity = PACKAGES[key]
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
        _safe_extract(tarball, staging, key)
        count = verify_folder(staging, key)
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


def _wanted(name: str, keep: tuple[str, ...]) -> bool:
    """Whether a path inside the package (without npm's `package/` prefix) is one UNPACK keeps."""
    for entry in keep:
        if entry.endswith("/"):
            if name.startswith(entry):
                return True
        elif "*" in entry:
            if "/" not in name and fnmatch(name, entry):
                return True
        elif name == entry:
            return True
    return False


def _safe_extract(tarball: Path, dest: Path, key: str) -> None:
    """Unpack the files UNPACK[key] names (not sprite sheets, not code) from npm's `package/` prefix."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith("package/") and _wanted(m.name[len("package/"):], UNPACK[key]):
                m.name = m.name[len("package/"):]
                if m.name.startswith("/") or ".." in Path(m.name).parts:  # also refused by the "data" filter
                    raise EmojiDataError(f"{tarball.name}: unsafe path {m.name!r} in the tarball.")
                members.append(m)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older Python: regular files only, paths checked above
            tar.extractall(dest, members=members)


def verify_folder(folder: Path, key: str) -> int:
    """The unpacked package has what its styles need; returns its image count (emojibase: its entries)."""
    if key == LABELS_PACKAGE:
        try:
            return len(json.loads((folder / "en" / "data.json").read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise EmojiDataError(f"{folder}: en/data.json is missing or unreadable ({err}).") from None
    styles = [s for s, src in STYLE_SOURCES.items() if src.package == key]
    if STYLE_SOURCES[styles[0]].kind == "png":
        return _verify_png_package(folder, styles[0])
    count = 0
    for style in styles:
        src = STYLE_SOURCES[style]
        try:
            found = len(read_sprite(folder / src.images)) if src.kind == "sprite" else len(_svg_files(folder / src.images))
        except (OSError, SyntaxError) as err:  # ET.ParseError is a SyntaxError
            raise EmojiDataError(f"{folder}: {src.images} is missing or unreadable ({err}).") from None
        if not found:
            raise EmojiDataError(f"{folder}: no {style} images in {src.images}.")
        count += found
    return count


def _verify_png_package(folder: Path, style: str) -> int:
    """emoji.json parses and every image it flags for `style` exists; returns the image count."""
    try:
        records = json.loads((folder / "emoji.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EmojiDataError(f"{folder}: emoji.json is missing or unreadable ({err}).") from None
    images = list_images(records, style)
    img_dir = folder / STYLE_SOURCES[style].images
    missing = [e.image for e in images if not (img_dir / e.image).is_file()]
    if not images or missing:
        raise EmojiDataError(f"{folder}: {len(missing)} of {len(images)} {style} images missing, e.g. {missing[:3]}.")
    return len(images)


# --- metadata and captions -------------------------------------------------------------------------


def list_images(records: list[dict], style: str, limit: int | None = None) -> list[EmojiImage]:
    """The images of a PNG style (emoji.json): each emoji flagged has_img_<style>, then its skin
    variations with their own images; in sort_order. `limit` keeps the first N emoji (by sort_order),
    all their images."""
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


def code_key(code_points: str) -> str:
    """'1f385-1F3FB', '2764-fe0f', 'a9' -> '1F385-1F3FB', '2764', '00A9': how the sources' code points are
    compared (upper case, 4+ hex digits, the variation selector FE0F dropped). ValueError if not hex."""
    parts = [f"{int(p, 16):04X}" for p in code_points.split("-") if p]
    if not parts:
        raise ValueError(f"no code points in {code_points!r}")
    return "-".join(p for p in parts if p != "FE0F")


def name_slug(text: str) -> str:
    """'Santa Claus' -> 'santa-claus', 'man’s shoe' -> 'mans-shoe', 'piñata' -> 'pinata': the form of
    fluentui-emoji's file names."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower().replace("'", "")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")


@dataclass
class EmojiIndex:
    """emoji.json's emoji by code points (so every style names an emoji as the 64 px set does), plus
    emojibase's CLDR labels, to name code points emoji.json lacks and to read fluentui-emoji's file names."""

    variants: dict[str, tuple[dict, str | None, str]]  # code_key -> (emoji.json record, skin tone key, unified)
    labels: dict[str, str]  # code_key -> CLDR label
    by_name: dict[str, str]  # name_slug -> code_key (labels, labels + "-<tone>", emoji.json names, short names)
    by_compact: dict[str, str]  # the same slugs without "-": "blackbird" for "black bird"

    @classmethod
    def build(cls, records: list[dict], emojibase: list[dict]) -> EmojiIndex:
        variants, labels, by_name = {}, {}, {}
        for r in sorted(records, key=lambda r: (r.get("sort_order", 0), r["unified"])):
            for unified in filter(None, (r["unified"], r.get("non_qualified"))):
                variants.setdefault(code_key(unified), (r, None, r["unified"]))
            for tone, v in sorted((r.get("skin_variations") or {}).items()):
                for unified in filter(None, (v["unified"], v.get("non_qualified"))):
                    variants.setdefault(code_key(unified), (r, tone, v["unified"]))
        for e in emojibase:  # CLDR labels first: fluentui-emoji names its files by them
            key = code_key(e["hexcode"])
            labels.setdefault(key, e["label"])
            by_name.setdefault(name_slug(e["label"]), key)
            for skin in e.get("skins") or ():
                if skin.get("tone") in (1, 2, 3, 4, 5):  # one tone, 1 = light (a list: several people's tones)
                    tone_word = list(SKIN_TONES.values())[skin["tone"] - 1]  # fluentui-emoji's file name suffix
                    by_name.setdefault(f"{name_slug(e['label'])}-{tone_word}", code_key(skin["hexcode"]))
        for r in records:
            for name in (r.get("name"), *(r.get("short_names") or ())):
                if name:
                    by_name.setdefault(name_slug(name), code_key(r["unified"]))
        by_compact = {}
        for slug, key in by_name.items():
            by_compact.setdefault(slug.replace("-", ""), key)
        return cls(variants, labels, by_name, by_compact)

    def key_for_name(self, file_stem: str) -> str | None:
        """fluentui-emoji's 'santa-claus-light' / 'grinning-face-default' -> code points, or None."""
        slug = name_slug(file_stem.removesuffix("-default"))
        for candidate in (slug, *(re.sub(pattern, replacement, slug) for pattern, replacement in FLUENT_RENAMES)):
            key = self.by_name.get(candidate) or self.by_compact.get(candidate.replace("-", ""))
            if key:
                return key
        return None

    def emoji_image(self, style: str, image: str, code_points: str) -> EmojiImage | None:
        """The EmojiImage of one SVG with these code points, named as described in the module doc; None: no name."""
        try:
            key = code_key(code_points)
        except ValueError:
            return None
        parts = key.split("-")
        tones = [p for p in parts if p in SKIN_TONES]
        base_key = "-".join(p for p in parts if p not in SKIN_TONES)
        if key in self.variants:  # emoji.json has it: today's name, tone and base
            record, tone, unified = self.variants[key]
        elif tones and base_key in self.variants and self.variants[base_key][1] is None:  # a tone emoji.json lacks
            record, tone, unified = self.variants[base_key][0], "-".join(tones), key
        elif key in self.labels:  # not in emoji.json: the CLDR label, no category
            return EmojiImage(style=style, image=image, unified=key, base_unified=base_key, name=self.labels[key],
                              short_names=(), category="", subcategory="", skin_tone=None, sort_order=10**6)
        else:
            return None
        return EmojiImage(style=style, image=image, unified=unified, base_unified=record["unified"],
                          name=record.get("name") or record.get("short_name") or record["unified"],
                          short_names=tuple(record.get("short_names") or ()), category=record.get("category") or "",
                          subcategory=record.get("subcategory") or "", skin_tone=tone,
                          sort_order=record.get("sort_order", 0))


def list_svg_images(style: str, folder: Path, index: EmojiIndex, limit: int | None = None,
                    skipped: Counter | None = None) -> list[EmojiImage]:
    """The images of an SVG style, named through `index`, in emoji.json's sort order (then tone, code
    points); one per emoji variant. Files with no name, or a second file of the same variant, are counted
    in `skipped`. `limit` keeps the first N base emoji."""
    src = STYLE_SOURCES[style]
    skipped = Counter() if skipped is None else skipped
    if src.kind == "sprite":
        found = [(symbol, symbol) for symbol in read_sprite(folder / src.images)]
    else:
        found = [(path.name, path.stem) for path in _svg_files(folder / src.images)]
    images = []
    for image, label in sorted(found):
        if src.kind == "svg_by_name":
            code_points = index.key_for_name(label)
            if code_points is None:
                skipped["name not matched"] += 1
                continue
        else:
            code_points = label
        e = index.emoji_image(style, image, code_points)
        if e is None:
            skipped["no name"] += 1
        else:
            images.append(e)
    images.sort(key=lambda e: (e.sort_order, e.base_unified, e.skin_tone or "", e.unified, e.image))
    out, seen = [], set()
    for e in images:
        if e.unified in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(e.unified)
        out.append(e)
    if limit:
        keep = set(list(dict.fromkeys(e.base_unified for e in out))[:limit])
        out = [e for e in out if e.base_unified in keep]
    return out


def _svg_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix == ".svg" and p.is_file())


def read_sprite(path: Path) -> dict[str, str]:
    """An svgmoji sprite's symbols: id (code points) -> a standalone SVG document of that emoji. The
    sprite is one <svg> whose child <svg viewBox=... id=...> elements are the emoji (each self-contained:
    its gradients and clip paths inside it)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    return {child.get("id"): ET.tostring(child, encoding="unicode")
            for child in root if child.tag == f"{{{SVG_NS}}}svg" and child.get("id")}


def skin_tone_words(tone: str | None) -> str | None:
    """'1F3FB' -> 'light skin tone'; '1F3FB-1F3FF' -> 'light and dark skin tones'; same tone twice -> once."""
    if not tone:
        return None
    words = [SKIN_TONES.get(t.upper(), t.lower()) for t in tone.split("-")]
    words = list(dict.fromkeys(words))
    return f"{words[0]} skin tone" if len(words) == 1 else f"{' and '.join(words)} skin tones"


def style_words(style: str) -> str:
    """How captions name a style: 'fluent-high-contrast' -> 'fluent high contrast'; 'google' -> 'google'."""
    return style.replace("-", " ")


def build_caption(record: dict | EmojiImage, style: str, skin_tone: str | None = None) -> str:
    """The caption of one image, from emoji.json fields (a record dict or an EmojiImage).

    "an emoji of <name>, <short names>, category <category>, subcategory <subcategory>, <style> style
    [, <tone> skin tone(s)]": all lower case; short names with "_" -> " ", those equal to the name (or
    repeated) dropped; empty parts left out; a style's "-" read as a space. `skin_tone` is a
    skin_variations key ("1F3FB", "1F3FB-1F3FF"); for an EmojiImage its own skin_tone is used when none
    is given."""
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
    parts.append(f"{style_words(style)} style")
    tone = skin_tone_words(skin_tone)
    if tone:
        parts.append(tone)
    return ", ".join(parts)


# --- images and split ------------------------------------------------------------------------------


def on_white(rgba):
    """An RGBA PIL image alpha-composited on an opaque white background, as RGB."""
    from PIL import Image

    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_rgb(path: Path, size: int = IMAGE_SIZE):
    """The PNG alpha-composited on white, as an RGB PIL image of size x size."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.LANCZOS)
    return on_white(rgba)


def render_svg(svg: str, size: int):
    """An SVG document drawn by resvg to fit a size x size square (centred, aspect kept: a 3:2 flag gets
    white bands), composited on white, as RGB. UnreadableImage when it does not parse or draws nothing."""
    from PIL import Image

    try:
        import resvg_py
    except ImportError:
        raise EmojiDataError("Rendering the SVG emoji styles needs resvg-py: pip install -r requirements.txt "
                             "(or pip install resvg-py).") from None
    try:  # width and height both given: resvg fits the drawing inside, keeping its aspect ratio
        png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True)
        with Image.open(io.BytesIO(bytes(png))) as im:
            drawn = im.convert("RGBA")
    except (ValueError, OSError) as err:
        raise UnreadableImage("unreadable SVG", str(err)) from None
    if drawn.getchannel("A").getbbox() is None:
        raise UnreadableImage("empty SVG")
    square = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    square.paste(drawn, ((size - drawn.width) // 2, (size - drawn.height) // 2))
    return on_white(square)


def load_image(folder: Path, e: EmojiImage, size: int, sprites: dict[Path, dict[str, str]]):
    """One image of `e` (in its package `folder`) as an RGB PIL image of size x size; UnreadableImage if
    it cannot be used. `sprites` caches parsed sprite files between calls."""
    src = STYLE_SOURCES[e.style]
    path = folder / src.images
    if src.kind == "sprite":
        if path not in sprites:
            sprites[path] = read_sprite(path)
        return render_svg(sprites[path][e.image], size)
    path = path / e.image
    if not path.is_file():
        raise UnreadableImage("missing file", str(path))
    if src.kind == "png":
        try:
            return load_rgb(path, size)
        except OSError as err:  # PIL.UnidentifiedImageError is an OSError
            raise UnreadableImage("unreadable PNG", str(err)) from None
    try:
        svg = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UnreadableImage("unreadable SVG", str(err)) from None
    return render_svg(svg, size)


def split_of(unified: str, val_fraction: float = 0.05) -> str:
    """'val' or 'train', from a stable hash of the (base) emoji's unified code points."""
    h = int.from_bytes(hashlib.sha256(unified.upper().encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def output_name(e: EmojiImage) -> str:
    """The PNG's name in OUT/<split>/: '<style>_<image stem>.png' for the PNG sets (as the 64 px set always
    had), '<style>_<unified, lower case>.png' for the SVG styles."""
    stem = Path(e.image).stem if STYLE_SOURCES[e.style].kind == "png" else e.unified.lower()
    return f"{e.style}_{stem}.png"


# --- the imagefolder output ------------------------------------------------------------------------


def write_imagefolder(out: Path, package_dirs: dict[str, Path], *, val_fraction: float = 0.05,
                      limit: int | None = None, progress: bool = True, image_size: int = IMAGE_SIZE,
                      index: EmojiIndex | None = None) -> dict:
    """Write OUT/{train,val}/ (PNGs + metadata.jsonl) from unpacked package folders (style -> folder);
    returns counts: per style, per split, per style and split, and the skipped images per style and reason.
    The SVG styles need `index` (EmojiIndex) to name their images."""
    from tqdm.auto import tqdm

    items = []
    skipped = {s: Counter() for s in package_dirs}
    for style, folder in package_dirs.items():
        if STYLE_SOURCES[style].kind == "png":
            records = json.loads((folder / "emoji.json").read_text(encoding="utf-8"))
            items += [(folder, e) for e in list_images(records, style, limit)]
        else:
            if index is None:
                raise EmojiDataError(f"The {style} style needs the emoji names (emoji.json, emojibase): use build_dataset.")
            items += [(folder, e) for e in list_svg_images(style, folder, index, limit, skipped[style])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = {s: Path(tempfile.mkdtemp(prefix=f".{s}-", dir=out)) for s in ("train", "val")}
    lines = {"train": [], "val": []}
    counts = {"styles": {s: 0 for s in package_dirs}, "train": 0, "val": 0,
              "by_split": {s: {"train": 0, "val": 0} for s in package_dirs}, "skipped": skipped}
    sprites: dict[Path, dict[str, str]] = {}
    try:
        for folder, e in tqdm(items, desc="emoji images", unit="img", disable=not progress):
            try:
                image = load_image(folder, e, image_size, sprites)
            except UnreadableImage as err:
                skipped[e.style][err.reason] += 1
                continue
            split = split_of(e.base_unified, val_fraction)
            file_name = output_name(e)
            image.save(staging[split] / file_name, optimize=False)
            lines[split].append({"file_name": file_name, "text": build_caption(e, e.style), "style": e.style,
                                 "unified": e.unified, "category": e.category, "subcategory": e.subcategory,
                                 "name": e.name, "skin_tone": e.skin_tone})
            counts["styles"][e.style] += 1
            counts["by_split"][e.style][split] += 1
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


def default_styles(image_size: int) -> tuple[str, ...]:
    return STYLES if image_size == IMAGE_SIZE else SVG_STYLES


def check_styles(styles, image_size: int) -> list[str]:
    """The styles as a list; EmojiDataError for an unknown one, or a PNG set at a size it does not ship."""
    styles = list(styles)
    unknown = [s for s in styles if s not in STYLE_SOURCES]
    if unknown or not styles:
        raise EmojiDataError(f"Unknown style {', '.join(unknown) or '(none)'}: choose from {', '.join(ALL_STYLES)}.")
    upscaled = [s for s in styles if STYLE_SOURCES[s].kind == "png" and image_size != IMAGE_SIZE]
    if upscaled:
        raise EmojiDataError(
            f"{', '.join(upscaled)}: these ship {IMAGE_SIZE}x{IMAGE_SIZE} PNGs only, and upscaled to {image_size} they "
            f"would teach blur. Use the SVG styles at --image_size {image_size} ({', '.join(SVG_STYLES)}: noto and "
            f"twemoji are the same Google and Twitter designs), or --image_size {IMAGE_SIZE} for {', '.join(upscaled)}.")
    return styles


def load_index(cache_root: Path | None = None, *, quiet: bool = False) -> EmojiIndex:
    names = ensure_package(NAMES_PACKAGE, cache_root, quiet=quiet)
    labels = ensure_package(LABELS_PACKAGE, cache_root, quiet=quiet)
    return EmojiIndex.build(json.loads((names / "emoji.json").read_text(encoding="utf-8")),
                            json.loads((labels / "en" / "data.json").read_text(encoding="utf-8")))


def build_dataset(out: Path, styles=None, *, val_fraction: float = 0.05, limit: int | None = None,
                  cache_root: Path | None = None, progress: bool = True, image_size: int = IMAGE_SIZE) -> dict:
    styles = check_styles(default_styles(image_size) if styles is None else styles, image_size)
    dirs = {s: ensure_package(STYLE_SOURCES[s].package, cache_root, quiet=not progress) for s in styles}
    needs_index = any(STYLE_SOURCES[s].kind != "png" for s in styles)
    index = load_index(cache_root, quiet=not progress) if needs_index else None
    counts = write_imagefolder(out, dirs, val_fraction=val_fraction, limit=limit, progress=progress,
                               image_size=image_size, index=index)
    if index is not None:
        write_cldr_names(out, index)
    else:  # a PNG-only build over an earlier SVG one: no names of another build
        (Path(out) / CLDR_NAMES).unlink(missing_ok=True)
    return counts


def write_cldr_names(out: Path, index: EmojiIndex) -> Path:
    """OUT/cldr_names.json: {unified code points, as in the metadata: CLDR name} for OUT's emoji whose CLDR
    name is not already their name ("red heart" for HEAVY BLACK HEART, "thumbs up" for THUMBS UP SIGN). The
    captions are emoji.json's names; people type the names their phones show, and the built-in model's
    prompt lookup (reproduce_mini.caption_table -> captions.json) takes these as further short names."""
    names = {}
    for split in ("train", "val"):
        for line in (Path(out) / split / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            label = index.labels.get(code_key(row["unified"]))
            if label and label.lower() != str(row.get("name", "")).lower():
                names[row["unified"]] = label
    path = Path(out) / CLDR_NAMES
    path.write_text(json.dumps(dict(sorted(names.items())), indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def summary(counts: dict) -> str:
    """A table: images per style and split, and what was skipped (per reason)."""
    rows = [f"{'style':<22}{'train':>7}{'val':>7}  skipped"]
    for style, n in counts["by_split"].items():
        reasons = counts["skipped"].get(style) or {}
        why = ", ".join(f"{reason}: {k}" for reason, k in sorted(reasons.items()))
        rows.append(f"{style:<22}{n['train']:>7}{n['val']:>7}  {sum(reasons.values())}" + (f" ({why})" if why else ""))
    total_skipped = sum(sum(c.values()) for c in counts["skipped"].values())
    rows.append(f"{'all':<22}{counts['train']:>7}{counts['val']:>7}  {total_skipped}")
    return "\n".join(rows)


def build_command(out, image_size: int = IMAGE_SIZE) -> str:
    """The command that writes the emoji set for `image_size` px images to `out`, with that size's default styles
    (64 px: the PNG styles of teacher v1; other sizes: the SVG styles of teacher v2)."""
    return f"python train/emoji_data.py --out {out}" + ("" if image_size == IMAGE_SIZE else f" --image_size {image_size}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Licences: see train/EMOJI_NOTICE.md (copied to OUT/NOTICE.md).")
    parser.add_argument("--out", required=True, type=Path, help="output folder: OUT/train and OUT/val imagefolders")
    parser.add_argument("--styles", default=None,
                        help=f"comma-separated, from {', '.join(ALL_STYLES)} (default: {','.join(STYLES)} at --image_size "
                             f"{IMAGE_SIZE}, else {','.join(SVG_STYLES)})")
    parser.add_argument("--image_size", type=int, default=IMAGE_SIZE,
                        help=f"image side in pixels (default {IMAGE_SIZE}: the 64 px set; 128 for teacher v2: SVG styles only)")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="fraction of emoji in val (default 0.05)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N emoji (by sort order) per style")
    parser.add_argument("--cache_root", type=Path, default=None, help="package cache (default: $SDXS_CACHE/emoji or ~/.cache/sdxs/emoji)")
    args = parser.parse_args(argv)
    if not 16 <= args.image_size <= 1024:
        parser.error("--image_size must be in [16, 1024]")
    styles = None if args.styles is None else [s.strip() for s in args.styles.split(",") if s.strip()]
    try:
        styles = check_styles(default_styles(args.image_size) if styles is None else styles, args.image_size)
    except EmojiDataError as err:
        parser.error(f"--styles: {err}")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val_fraction must be in [0, 1)")
    start = time.perf_counter()
    try:
        counts = build_dataset(args.out, styles, val_fraction=args.val_fraction, limit=args.limit,
                               cache_root=args.cache_root, image_size=args.image_size)
    except EmojiDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_style = ", ".join(f"{s}: {n}" for s, n in counts["styles"].items())
    print(f"{counts['train'] + counts['val']} images ({per_style}); train {counts['train']}, val {counts['val']} "
          f"-> {args.out}/train, {args.out}/val ({time.perf_counter() - start:.1f} s)")
    print(summary(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
