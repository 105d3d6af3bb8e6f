"""The emoji data set (train/emoji_data.py): metadata, captions, compositing, the split, the imagefolder
output read back through train/common.py, and the npm fetch / cache, all on a tiny fake package (no
network, no npm: a fake `npm` script stands in where the fetch itself is tested)."""

import base64
import hashlib
import io
import json
import os
import stat
import tarfile
from collections import Counter

import pytest
from PIL import Image

from train import common, emoji_data
from train.emoji_data import EmojiDataError

RECORDS = [
    {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "short_name": "grinning",
     "short_names": ["grinning"], "category": "Smileys & Emotion", "subcategory": "face-smiling", "sort_order": 1,
     "has_img_google": True, "has_img_twitter": True},
    {"name": "FATHER CHRISTMAS", "unified": "1F385", "image": "1f385.png", "short_name": "santa",
     "short_names": ["santa", "father_christmas"], "category": "People & Body", "subcategory": "person-fantasy",
     "sort_order": 3, "has_img_google": True, "has_img_twitter": True,
     "skin_variations": {"1F3FB": {"unified": "1F385-1F3FB", "image": "1f385-1f3fb.png",
                                   "has_img_google": True, "has_img_twitter": True},
                         "1F3FF": {"unified": "1F385-1F3FF", "image": "1f385-1f3ff.png",
                                   "has_img_google": False, "has_img_twitter": True}}},
    {"name": "Spain Flag", "unified": "1F1EA-1F1F8", "image": "1f1ea-1f1f8.png", "short_name": "es",
     "short_names": ["es", "flag-es"], "category": "Flags", "subcategory": "country-flag", "sort_order": 2,
     "has_img_google": True, "has_img_twitter": True},
    {"name": "GHOST OF A TWEET", "unified": "1FAE0", "image": "1fae0.png", "short_name": "ghost_tweet",
     "short_names": ["ghost_tweet"], "category": "Symbols", "subcategory": "other-symbol", "sort_order": 4,
     "has_img_google": False, "has_img_twitter": True},
]


def _png(color=(255, 0, 0, 255), size=64, transparent=False) -> Image.Image:
    im = Image.new("RGBA", (size, size), color)
    if transparent:  # left half fully transparent, a half-transparent blue pixel at (40, 0)
        im.paste((0, 0, 0, 0), (0, 0, size // 2, size))
        im.putpixel((40, 0), (0, 0, 255, 128))
    return im


def make_package(folder, style, records=RECORDS):
    """A fake unpacked emoji-datasource-<style> folder: emoji.json + img/<style>/64/*.png."""
    img = folder / "img" / style / "64"
    img.mkdir(parents=True)
    (folder / "emoji.json").write_text(json.dumps(records))
    for i, e in enumerate(emoji_data.list_images(records, style)):
        _png((20 * i, 100, 50, 255), transparent=e.unified == "1F600").save(img / e.image)
    return folder


@pytest.fixture
def packages(tmp_path):
    """Both styles as complete cache folders under tmp_path/cache (markers written)."""
    root = tmp_path / "cache"
    for style in emoji_data.STYLES:
        folder = make_package(emoji_data.package_dir(style, root), style)
        (folder / emoji_data.MARKER).write_text("{}")
    return root


@pytest.fixture
def no_npm(monkeypatch):
    monkeypatch.setattr(emoji_data.shutil, "which", lambda name: None)

    def refuse(*a, **k):
        raise AssertionError("npm must not be called")
    monkeypatch.setattr(emoji_data.subprocess, "run", refuse)


# --- metadata and captions -------------------------------------------------------------------------


def test_metadata_parsing_with_skin_variations_and_style_flags():
    google = emoji_data.list_images(RECORDS, "google")
    twitter = emoji_data.list_images(RECORDS, "twitter")
    assert [e.unified for e in google] == ["1F600", "1F1EA-1F1F8", "1F385", "1F385-1F3FB"]  # sort_order, then skins
    assert [e.unified for e in twitter] == ["1F600", "1F1EA-1F1F8", "1F385", "1F385-1F3FB", "1F385-1F3FF", "1FAE0"]
    santa_light = google[3]
    assert (santa_light.base_unified, santa_light.skin_tone, santa_light.image) == ("1F385", "1F3FB", "1f385-1f3fb.png")
    assert santa_light.short_names == ("santa", "father_christmas") and santa_light.category == "People & Body"
    assert [e.unified for e in emoji_data.list_images(RECORDS, "twitter", limit=2)] == ["1F600", "1F1EA-1F1F8"]


def test_build_caption():
    grin, flag, santa = RECORDS[0], RECORDS[2], RECORDS[1]
    assert emoji_data.build_caption(grin, "google") == \
        "an emoji of grinning face, grinning, category smileys & emotion, subcategory face-smiling, google style"
    assert emoji_data.build_caption(santa, "twitter", "1F3FB") == (
        "an emoji of father christmas, santa, category people & body, subcategory person-fantasy, "
        "twitter style, light skin tone")
    assert emoji_data.build_caption(flag, "google").startswith("an emoji of spain flag, es, flag-es, category flags,")
    # an EmojiImage carries its own skin tone; the dict and the EmojiImage give the same caption
    image = emoji_data.list_images(RECORDS, "google")[3]
    assert emoji_data.build_caption(image, "google") == emoji_data.build_caption(santa, "google", "1F3FB")
    assert emoji_data.skin_tone_words("1F3FC-1F3FF") == "medium-light and dark skin tones"
    assert emoji_data.skin_tone_words("1F3FD-1F3FD") == "medium skin tone"
    assert emoji_data.build_caption({"name": "X", "unified": "58"}, "google") == "an emoji of x, google style"


# --- images and split ------------------------------------------------------------------------------


def test_alpha_composited_on_white(tmp_path):
    _png((255, 0, 0, 255), transparent=True).save(tmp_path / "a.png")
    rgb = emoji_data.load_rgb(tmp_path / "a.png")
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white
    assert rgb.getpixel((63, 63)) == (255, 0, 0)  # opaque stays
    r, g, b = rgb.getpixel((40, 0))  # half-transparent blue over white
    assert b == 255 and 125 <= r <= 129 and r == g
    _png((0, 255, 0, 255), size=32).save(tmp_path / "small.png")  # another size is resized
    assert emoji_data.load_rgb(tmp_path / "small.png").size == (64, 64)


def test_split_is_deterministic_and_keyed_by_the_base_emoji():
    codes = [f"{0x1F300 + i:X}" for i in range(4000)]
    splits = [emoji_data.split_of(c, 0.05) for c in codes]
    assert splits == [emoji_data.split_of(c, 0.05) for c in codes]
    assert 0.035 < splits.count("val") / len(codes) < 0.065
    # stable across runs and machines: sha256-based, pinned values
    assert emoji_data.split_of("1F600", 0.5) == emoji_data.split_of("1f600", 0.5)
    fraction = int.from_bytes(hashlib.sha256(b"1F600").digest()[:8], "big") / 2**64
    assert emoji_data.split_of("1F600", fraction + 1e-9) == "val" and emoji_data.split_of("1F600", fraction) == "train"
    assert emoji_data.split_of("1F600", 0.0) == "train" and emoji_data.split_of("1F600", 0.999999) == "val"
    # every image of one emoji (both styles, all skin tones) shares its split
    for frac in (0.3, 0.5, 0.7):
        by_base = {}
        for style in emoji_data.STYLES:
            for e in emoji_data.list_images(RECORDS, style):
                by_base.setdefault(e.base_unified, set()).add(emoji_data.split_of(e.base_unified, frac))
        assert all(len(s) == 1 for s in by_base.values())


# --- the imagefolder output ------------------------------------------------------------------------


def _val_fraction_with_both_splits():
    """A val fraction that puts some (not all) fixture emoji in val, found from the hash itself."""
    fracs = sorted(int.from_bytes(hashlib.sha256(r["unified"].encode()).digest()[:8], "big") / 2**64 for r in RECORDS)
    return (fracs[0] + fracs[1]) / 2  # exactly one emoji in val


def test_imagefolder_output_and_read_back_through_common(packages, tmp_path, no_npm):
    out = tmp_path / "out"
    frac = _val_fraction_with_both_splits()
    counts = emoji_data.build_dataset(out, val_fraction=frac, cache_root=packages, progress=False)
    assert counts["styles"] == {"google": 4, "twitter": 6} and counts["train"] + counts["val"] == 10 and counts["val"] > 0
    rows = {s: [json.loads(line) for line in (out / s / "metadata.jsonl").read_text().splitlines()] for s in ("train", "val")}
    assert len(rows["train"]) == counts["train"] and len(rows["val"]) == counts["val"]
    every = rows["train"] + rows["val"]
    assert {r["file_name"] for r in every} == {f"{e.style}_{e.image}" for s in emoji_data.STYLES
                                               for e in emoji_data.list_images(RECORDS, s)}
    santa = next(r for r in every if r["file_name"] == "google_1f385-1f3fb.png")
    assert santa == {"file_name": "google_1f385-1f3fb.png", "style": "google", "unified": "1F385-1F3FB",
                     "category": "People & Body", "subcategory": "person-fantasy", "name": "FATHER CHRISTMAS",
                     "skin_tone": "1F3FB", "text": emoji_data.build_caption(RECORDS[1], "google", "1F3FB")}
    for split, lines in rows.items():
        for r in lines:
            assert emoji_data.split_of(r["unified"].split("-")[0] if r["skin_tone"] else r["unified"], frac) == split
            im = Image.open(out / split / r["file_name"])
            assert im.mode == "RGB" and im.size == (64, 64)
    grin = Image.open(out / next(s for s in rows if any(r["unified"] == "1F600" for r in rows[s])) / "google_1f600.png")
    assert grin.getpixel((0, 0)) == (255, 255, 255)  # the transparent fixture image, on white
    assert (out / "NOTICE.md").read_text().startswith("# Emoji data set")
    # the shared training base reads it as an imagefolder
    for split in ("train", "val"):
        source = common.read_sources(None, str(out / split), "text", None, 0)
        assert source.mode == "encode" and source.prompts == [r["text"] for r in rows[split]]
        assert source.images == [out / split / r["file_name"] for r in rows[split]] and all(p.is_file() for p in source.images)
    # a second run gives the same files (deterministic) and replaces the folders cleanly
    before = {s: (out / s / "metadata.jsonl").read_bytes() for s in rows}
    emoji_data.build_dataset(out, val_fraction=frac, cache_root=packages, progress=False)
    assert before == {s: (out / s / "metadata.jsonl").read_bytes() for s in rows}
    assert sorted(p.name for p in out.iterdir()) == ["NOTICE.md", "train", "val"]


def test_cli_counts_and_limit(packages, tmp_path, no_npm, capsys):
    out = tmp_path / "cli"
    assert emoji_data.main(["--out", str(out), "--styles", "twitter", "--limit", "2", "--val_fraction", "0",
                            "--cache_root", str(packages)]) == 0
    assert "2 images (twitter: 2); train 2, val 0" in capsys.readouterr().out
    assert (out / "val" / "metadata.jsonl").read_text() == ""
    with pytest.raises(SystemExit):
        emoji_data.main(["--out", str(out), "--styles", "apple"])


# --- fetch and cache -------------------------------------------------------------------------------


def test_cache_reused_without_npm(packages, monkeypatch, no_npm):
    monkeypatch.setenv("SDXS_CACHE", str(packages.parent))
    monkeypatch.setattr(emoji_data, "emoji_cache_root", lambda: packages)  # == $SDXS_CACHE/emoji, checked below
    assert emoji_data.ensure_package("google") == emoji_data.package_dir("google", packages)
    monkeypatch.undo()
    monkeypatch.setenv("SDXS_CACHE", str(packages.parent / "elsewhere"))
    from sdxs.tokenizer import cache_dir
    assert emoji_data.package_dir("google") == cache_dir() / "emoji" / "emoji-datasource-google-16.0.0"


def test_clear_error_when_npm_is_missing(tmp_path, no_npm, capsys):
    with pytest.raises(EmojiDataError, match="Install Node.js/npm") as err:
        emoji_data.ensure_package("google", tmp_path / "empty")
    assert "copy a cache folder" in str(err.value) and "emoji-datasource-google-16.0.0" in str(err.value)
    assert emoji_data.main(["--out", str(tmp_path / "o"), "--cache_root", str(tmp_path / "empty")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: npm was not found") and "Traceback" not in stderr


def _fake_npm(bin_dir, script_body):
    bin_dir.mkdir(parents=True, exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script_body)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return npm


def test_clear_error_when_registry_unreachable(tmp_path, monkeypatch):
    _fake_npm(tmp_path / "bin", "echo 'npm error code ENOTFOUND' >&2\necho 'npm error network request failed' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    with pytest.raises(EmojiDataError, match="registry reachable") as err:
        emoji_data.ensure_package("twitter", tmp_path / "cache")
    assert "ENOTFOUND" in str(err.value) and "copy a cache folder" in str(err.value)
    assert not emoji_data.is_complete(emoji_data.package_dir("twitter", tmp_path / "cache"))


def _tarball(tmp_path, style, extra=None) -> tuple:
    """A .tgz laid out as npm packs it (package/...), with sprite sheets that must not be unpacked."""
    src = make_package(tmp_path / f"src-{style}", style)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            tar.add(path, arcname="package/" + path.relative_to(src).as_posix())
        for name, data in [(f"package/img/{style}/sheets/64.png", b"sheet"), ("package/LICENSE", b"MIT"), *(extra or [])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / f"emoji-datasource-{style}-16.0.0.tgz"
    path.write_bytes(buf.getvalue())
    return path, "sha512-" + base64.b64encode(hashlib.sha512(buf.getvalue()).digest()).decode()


def _npm_serving(tmp_path, monkeypatch, tgz, integrity):
    report = tmp_path / "report.json"
    report.write_text(json.dumps([{"filename": tgz.name, "integrity": integrity}]))
    # npm pack SPEC --json --pack-destination DIR
    _fake_npm(tmp_path / "bin", f'cp "{tgz}" "$5/"\ncat "{report}"\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])


def test_fetch_with_npm_verifies_unpacks_and_caches(tmp_path, monkeypatch):
    tgz, integrity = _tarball(tmp_path, "google")
    monkeypatch.setitem(emoji_data.PACKAGES, "google", ("emoji-datasource-google", "16.0.0", integrity))
    _npm_serving(tmp_path, monkeypatch, tgz, integrity)
    root = tmp_path / "cache"
    folder = emoji_data.ensure_package("google", root, quiet=True)
    assert folder == root / "emoji-datasource-google-16.0.0" and emoji_data.is_complete(folder)
    assert sorted(p.name for p in (folder / "img" / "google" / "64").iterdir()) == \
        sorted(e.image for e in emoji_data.list_images(RECORDS, "google"))
    assert not (folder / "img" / "google" / "sheets").exists() and (folder / "LICENSE").read_text() == "MIT"
    assert emoji_data.verify_folder(folder, "google") == 4
    assert sorted(p.name for p in root.iterdir()) == ["emoji-datasource-google-16.0.0"]  # no temp left
    monkeypatch.setattr(emoji_data.shutil, "which", lambda name: None)  # offline from now on
    assert emoji_data.ensure_package("google", root) == folder


def test_fetch_rejects_a_wrong_digest_and_unsafe_paths(tmp_path, monkeypatch):
    tgz, integrity = _tarball(tmp_path, "google")
    _npm_serving(tmp_path, monkeypatch, tgz, integrity)  # npm's report matches, the pinned value does not
    with pytest.raises(EmojiDataError, match="differs from the pinned"):
        emoji_data.ensure_package("google", tmp_path / "cache", quiet=True)
    bad, bad_integrity = _tarball(tmp_path / "bad", "google", extra=[("package/img/google/64/../../../../evil.png", b"x")])
    monkeypatch.setitem(emoji_data.PACKAGES, "google", ("emoji-datasource-google", "16.0.0", bad_integrity))
    _npm_serving(tmp_path / "bad", monkeypatch, bad, bad_integrity)
    with pytest.raises(EmojiDataError, match="unsafe path"):
        emoji_data.ensure_package("google", tmp_path / "cache2", quiet=True)
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.rglob("evil.png"))


# --- the SVG styles (128 px set) -------------------------------------------------------------------
# Fake packages in each real layout: @svgmoji/noto (one sprite of nested <svg id=code points>),
# @twemoji/svg (SVG files at the package root, named by code points without FE0F or leading zeros),
# fluentui-emoji (icons/{modern,flat,high-contrast}/<CLDR name>[-<tone>|-default].svg) and
# emojibase-data (en/data.json), plus emoji-datasource-google for the names (emoji.json).

HEART = {"name": "HEAVY BLACK HEART", "unified": "2764-FE0F", "non_qualified": "2764", "image": "2764-fe0f.png",
         "short_name": "heart", "short_names": ["heart"], "category": "Smileys & Emotion", "subcategory": "heart",
         "sort_order": 5, "has_img_google": True, "has_img_twitter": True}
RECORDS_V2 = RECORDS + [HEART]
EMOJIBASE = [
    {"label": "grinning face", "hexcode": "1F600"},
    {"label": "Santa Claus", "hexcode": "1F385",
     "skins": [{"label": "Santa Claus: light skin tone", "hexcode": "1F385-1F3FB", "tone": 1},
               {"label": "Santa Claus: dark skin tone", "hexcode": "1F385-1F3FF", "tone": 5}]},
    {"label": "flag: Spain", "hexcode": "1F1EA-1F1F8"},
    {"label": "red heart", "hexcode": "2764"},
    {"label": "red hair", "hexcode": "1F9B0"},  # a component emoji.json does not list
    {"label": "elf", "hexcode": "1F9DD"},
    {"label": "black bird", "hexcode": "1F426-200D-2B1B"},
]
SVG = 'xmlns="http://www.w3.org/2000/svg"'
YELLOW, RED, GOLD, PINK = (255, 204, 0), (198, 11, 30), (255, 196, 0), (244, 67, 54)


def _symbol(code_points, body, view_box="0 0 128 128"):
    return f'<svg viewBox="{view_box}" id="{code_points}" {SVG}>{body}</svg>'


# The grinning face is drawn only through <use xlink:href>: a sprite symbol that loses its xlink
# namespace when cut out of the sprite draws nothing (and is skipped as an empty SVG).
NOTO_SPRITE = (
    '<?xml version="1.0" encoding="utf-8"?><svg viewBox="0 0 2000 2000" xmlns="http://www.w3.org/2000/svg" '
    'xmlns:xlink="http://www.w3.org/1999/xlink"><style>:root>svg{display:none}:root>svg:target{display:block}</style>'
    + _symbol("1F600", '<defs><circle id="aaaa" cx="64" cy="64" r="48" fill="#FFCC00"/></defs><use xlink:href="#aaaa"/>')
    + _symbol("1F385", '<linearGradient id="aaab" x1="0" x2="0" y1="16" y2="112" gradientUnits="userSpaceOnUse">'
                       '<stop offset="0" stop-color="#E53935"/><stop offset="1" stop-color="#FFFFFF"/></linearGradient>'
                       '<path fill="url(#aaab)" d="M16 16h96v96H16z"/>')
    + _symbol("1F385-1F3FB", '<path fill="#FFE0B2" d="M16 16h96v96H16z"/>')
    + _symbol("1F1EA-1F1F8", '<path fill="#c60b1e" d="M0 0h750v500H0z"/><path fill="#ffc400" d="M0 125h750v250H0z"/>',
              "0 0 750 500")  # a 3:2 flag: white bands above and below
    + _symbol("2764-FE0F", '<path fill="#F44336" d="M64 112 16 56a24 24 0 0 1 48-24 24 24 0 0 1 48 24z"/>')
    + _symbol("1F9B0", '<path fill="#D84315" d="M24 40h80v48H24z"/>')
    + _symbol("1FAE0", "")  # well-formed but draws nothing: skipped, counted
    + "</svg>")

TWEMOJI = {  # file -> SVG (36x36 drawings, as Twemoji's)
    "1f600.svg": f'<svg {SVG} viewBox="0 0 36 36"><circle fill="#FFCC4D" cx="18" cy="18" r="16"/></svg>',
    "1f385.svg": f'<svg {SVG} viewBox="0 0 36 36"><path fill="#DD2E44" d="M4 4h28v28H4z"/></svg>',
    "1f385-1f3fb.svg": f'<svg {SVG} viewBox="0 0 36 36"><path fill="#F7DECE" d="M4 4h28v28H4z"/></svg>',
    "1f385-1f3fc.svg": f'<svg {SVG} viewBox="0 0 36 36"><path fill="#F3D2A2" d="M4 4h28v28H4z"/></svg>',  # a tone emoji.json lacks
    "2764.svg": f'<svg {SVG} viewBox="0 0 36 36"><path fill="#DD2E44" d="M18 32 4 14a7 7 0 0 1 14-4 7 7 0 0 1 14 4z"/></svg>',
    "2764-fe0f.svg": f'<svg {SVG} viewBox="0 0 36 36"><path fill="#BE1931" d="M4 4h28v28H4z"/></svg>',  # the same emoji again
    "1fae0.svg": f'<svg {SVG} viewBox="0 0 36 36"><circle fill="#CCD6DD" cx="18" cy="18',  # truncated: unreadable
    "e50a.svg": f'<svg {SVG} viewBox="0 0 36 36"><path fill="#1D9BF0" d="M4 4h28v28H4z"/></svg>',  # no name anywhere
}
FLUENT_NAMES = ("grinning-face", "santa-claus-default", "santa-claus-light", "santa-claus-dark", "red-heart",
                "person-wrestling")  # the last matches no CLDR name: skipped, counted
FLUENT_COLOURS = {"modern": "#FFB02E", "flat": "#F8312F", "high-contrast": "#212121"}


def _fluent_svg(colour):
    return f'<svg width="32" height="32" viewBox="0 0 32 32" fill="none" {SVG}><path d="M4 4h24v24H4z" fill="{colour}"/></svg>'


def write_package_tree(folder, key):
    """One npm package's files as its tarball holds them under package/ (including files not to unpack)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text(json.dumps({"name": emoji_data.PACKAGES[key][0]}))
    if key == "noto":
        (folder / "sprites").mkdir()
        (folder / "sprites" / "all.svg").write_text(NOTO_SPRITE)
        (folder / "dist").mkdir()
        (folder / "dist" / "svgmoji-noto.cjs.js").write_text("module.exports = {};")
        (folder / "LICENSE").write_text("MIT License\n")
    elif key == "twemoji":
        for name, svg in TWEMOJI.items():
            (folder / name).write_text(svg)
        (folder / "license").write_text("MIT License\n")
    elif key == "fluent":
        for variant, colour in FLUENT_COLOURS.items():
            (folder / "icons" / variant).mkdir(parents=True)
            names = FLUENT_NAMES if variant != "high-contrast" else ("grinning-face", "santa-claus-default")
            for name in names:
                (folder / "icons" / variant / f"{name}.svg").write_text(_fluent_svg(colour))
        (folder / "LICENSE").write_text("MIT License\n")
    elif key == "emojibase":
        (folder / "en").mkdir()
        (folder / "en" / "data.json").write_text(json.dumps(EMOJIBASE))
        (folder / "en" / "compact.json").write_text("[]")
        (folder / "LICENSE").write_text("MIT License\n")
    else:
        make_package(folder, key, RECORDS_V2)
    return folder


@pytest.fixture
def svg_packages(tmp_path):
    """Complete cache folders (markers written) of every package, with emoji.json = RECORDS_V2."""
    root = tmp_path / "cache"
    for key in emoji_data.PACKAGES:
        folder = write_package_tree(emoji_data.package_dir(key, root), key)
        (folder / emoji_data.MARKER).write_text("{}")
    return root


def _index(root):
    return emoji_data.load_index(root, quiet=True)


def _fraction_between(a, b):
    """A val fraction that puts exactly one of two split keys in val."""
    h = sorted(int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2**64 for k in (a, b))
    return (h[0] + h[1]) / 2


def _rows(out):
    return {s: [json.loads(line) for line in (out / s / "metadata.jsonl").read_text().splitlines()] for s in ("train", "val")}


def test_render_svg_fits_the_square_on_white():
    disc = f'<svg {SVG} viewBox="0 0 100 100"><circle cx="50" cy="50" r="30" fill="#ff0000"/>' \
           f'<circle cx="50" cy="10" r="8" fill="#0000ff" fill-opacity="0.5"/></svg>'
    rgb = emoji_data.render_svg(disc, 128)
    assert rgb.mode == "RGB" and rgb.size == (128, 128)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((127, 127)) == (255, 255, 255)  # transparent -> white
    assert rgb.getpixel((64, 64)) == (255, 0, 0)
    r, g, b = rgb.getpixel((64, 13))  # half-transparent blue over white, not over black
    assert b == 255 and 120 <= r <= 135 and r == g
    assert emoji_data.render_svg(disc, 64).size == (64, 64)
    flag = f'<svg {SVG} viewBox="0 0 750 500"><path fill="#c60b1e" d="M0 0h750v500H0z"/></svg>'
    rgb = emoji_data.render_svg(flag, 128)  # 3:2 -> 128x85, centred: white bands of 21 and 22 rows
    assert rgb.size == (128, 128) and rgb.getpixel((64, 10)) == (255, 255, 255) == rgb.getpixel((64, 117))
    assert rgb.getpixel((64, 64)) == RED and rgb.getpixel((0, 64)) == RED
    with pytest.raises(emoji_data.UnreadableImage) as err:
        emoji_data.render_svg(f'<svg {SVG} viewBox="0 0 10 10"><circle r="3"', 128)
    assert err.value.reason == "unreadable SVG"
    with pytest.raises(emoji_data.UnreadableImage) as err:
        emoji_data.render_svg(f'<svg {SVG} viewBox="0 0 10 10"/>', 128)
    assert err.value.reason == "empty SVG"


def test_svg_styles_are_named_as_the_64px_set(svg_packages):
    index = _index(svg_packages)
    folder = lambda style: emoji_data.package_dir(emoji_data.STYLE_SOURCES[style].package, svg_packages)
    skipped = {s: Counter() for s in emoji_data.SVG_STYLES}
    images = {s: emoji_data.list_svg_images(s, folder(s), index, skipped=skipped[s]) for s in emoji_data.SVG_STYLES}
    got = {s: {e.unified: (e.name, e.base_unified, e.skin_tone) for e in imgs} for s, imgs in images.items()}
    santa, santa_light = ("FATHER CHRISTMAS", "1F385", None), ("FATHER CHRISTMAS", "1F385", "1F3FB")
    heart = ("HEAVY BLACK HEART", "2764-FE0F", None)  # twemoji's "2764.svg" and noto's "2764-FE0F" alike
    assert got["noto"] == {"1F600": ("GRINNING FACE", "1F600", None), "1F385": santa, "1F385-1F3FB": santa_light,
                           "1F1EA-1F1F8": ("Spain Flag", "1F1EA-1F1F8", None), "2764-FE0F": heart,
                           "1F9B0": ("red hair", "1F9B0", None), "1FAE0": ("GHOST OF A TWEET", "1FAE0", None)}
    assert got["twemoji"] == {"1F600": ("GRINNING FACE", "1F600", None), "1F385": santa, "1F385-1F3FB": santa_light,
                              "1F385-1F3FC": ("FATHER CHRISTMAS", "1F385", "1F3FC"), "2764-FE0F": heart,
                              "1FAE0": ("GHOST OF A TWEET", "1FAE0", None)}
    fluent = {"1F600": ("GRINNING FACE", "1F600", None), "1F385": santa, "1F385-1F3FB": santa_light,
              "1F385-1F3FF": ("FATHER CHRISTMAS", "1F385", "1F3FF"), "2764-FE0F": heart}
    assert got["fluent-color"] == fluent == got["fluent-flat"]
    assert got["fluent-high-contrast"] == {k: fluent[k] for k in ("1F600", "1F385")}
    assert skipped["twemoji"] == {"no name": 1, "duplicate": 1} and skipped["fluent-color"] == {"name not matched": 1}
    assert [e.image for e in images["noto"]][:3] == ["1F600", "1F1EA-1F1F8", "1F385"]  # emoji.json's sort order
    assert {e.unified: e.image for e in images["fluent-flat"]}["1F385-1F3FF"] == "santa-claus-dark.svg"
    assert [e.unified for e in emoji_data.list_svg_images("noto", folder("noto"), index, limit=2)] == ["1F600", "1F1EA-1F1F8"]
    # fluentui-emoji's names that are not CLDR's, read through the rename rules and run-together words
    assert index.key_for_name("person-elf-default") == "1F9DD" and index.key_for_name("blackbird") == "1F426-200D-2B1B"
    assert index.key_for_name("person-wrestling") is None
    assert emoji_data.code_key("a9") == "00A9" and emoji_data.code_key("2764-fe0f") == "2764"


def test_128px_build_captions_pixels_and_skipped_counts(svg_packages, tmp_path, no_npm, capsys):
    out = tmp_path / "out128"
    assert emoji_data.main(["--out", str(out), "--image_size", "128", "--val_fraction", "0",
                            "--cache_root", str(svg_packages)]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)["train"]
    assert {r["style"] for r in rows} == set(emoji_data.SVG_STYLES)  # the default at 128: every SVG style, no PNG set
    by_file = {r["file_name"]: r for r in rows}
    assert len(by_file) == len(rows) == 6 + 5 + 5 + 5 + 2  # noto, twemoji: their broken 1FAE0 (and e50a, a duplicate) left out
    for r in rows:
        with Image.open(out / "train" / r["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (128, 128)
    santa_light = by_file["noto_1f385-1f3fb.png"]
    assert santa_light == {"file_name": "noto_1f385-1f3fb.png", "style": "noto", "unified": "1F385-1F3FB",
                           "category": "People & Body", "subcategory": "person-fantasy", "name": "FATHER CHRISTMAS",
                           "skin_tone": "1F3FB", "text": emoji_data.build_caption(RECORDS[1], "noto", "1F3FB")}
    assert santa_light["text"].endswith(", noto style, light skin tone")
    assert by_file["twemoji_2764-fe0f.png"]["text"] == \
        "an emoji of heavy black heart, heart, category smileys & emotion, subcategory heart, twemoji style"
    assert by_file["fluent-high-contrast_1f600.png"]["text"].endswith("subcategory face-smiling, fluent high contrast style")
    assert by_file["fluent-color_1f385-1f3ff.png"]["text"].endswith("fluent color style, dark skin tone")
    assert by_file["noto_1f9b0.png"]["text"] == "an emoji of red hair, noto style"
    # the CLDR names that differ from emoji.json's, for the apps' prompt lookup ("red heart" finds the heart)
    assert json.loads((out / emoji_data.CLDR_NAMES).read_text()) == {"1F385": "Santa Claus", "1F1EA-1F1F8": "flag: Spain",
                                                                     "2764-FE0F": "red heart"}
    from train.reproduce_mini import caption_table

    table = caption_table(out, "twemoji")
    assert table["red heart"] == table["heavy black heart"] == by_file["twemoji_2764-fe0f.png"]["text"]
    assert table["santa claus"] == table["father christmas"] and "grinning face" in table
    # every style, drawn from its own package: the right drawing under each file name, on white
    pixel = lambda name, xy=(64, 64): Image.open(out / "train" / name).getpixel(xy)
    assert pixel("noto_1f600.png") == YELLOW and pixel("noto_1f600.png", (0, 0)) == (255, 255, 255)
    assert pixel("noto_1f1ea-1f1f8.png") == GOLD and pixel("noto_1f1ea-1f1f8.png", (64, 30)) == RED
    assert pixel("noto_1f1ea-1f1f8.png", (64, 5)) == (255, 255, 255)
    assert pixel("twemoji_1f600.png") == (255, 204, 77) and pixel("twemoji_1f600.png", (2, 2)) == (255, 255, 255)
    assert pixel("twemoji_2764-fe0f.png") == (190, 25, 49)  # of two files of one emoji, the first by name: 2764-fe0f.svg
    assert pixel("noto_1f385-1f3fb.png") == (255, 224, 178) and pixel("twemoji_1f385-1f3fb.png") == (247, 222, 206)
    assert pixel("fluent-color_1f600.png") == (255, 176, 46) and pixel("fluent-flat_1f600.png") == (248, 49, 47)
    assert pixel("fluent-high-contrast_1f600.png") == (33, 33, 33) and pixel("fluent-flat_1f600.png", (1, 1)) == (255, 255, 255)
    # the summary: images per style and split, and every skipped image with its reason
    assert "23 images (noto: 6, twemoji: 5, fluent-color: 5, fluent-flat: 5, fluent-high-contrast: 2); train 23, val 0" in printed
    lines = {line.split()[0]: line for line in printed.splitlines() if line and line.split()[0] in {*emoji_data.SVG_STYLES, "all"}}
    assert lines["noto"].split()[1:] == ["6", "0", "1", "(empty", "SVG:", "1)"]
    assert lines["twemoji"].split()[1:] == ["5", "0", "3", "(duplicate:", "1,", "no", "name:", "1,", "unreadable", "SVG:", "1)"]
    assert lines["fluent-flat"].split()[1:] == ["5", "0", "1", "(name", "not", "matched:", "1)"]
    assert lines["fluent-high-contrast"].split()[1:4] == ["2", "0", "0"] and lines["all"].split()[1:] == ["23", "0", "6"]


def test_split_keeps_an_emoji_together_across_styles_and_sizes(svg_packages, tmp_path, no_npm):
    # Fractions that separate a skin variant from its base ("1F385-1F3FB" vs "1F385") and emoji.json's
    # unified from the FE0F-less code points ("2764-FE0F" vs "2764"): a split keyed by anything but the
    # base emoji's unified splits these emoji.
    for frac in (_fraction_between("1F385", "1F385-1F3FB"), _fraction_between("2764-FE0F", "2764")):
        split_by_name = {}
        for size, out in ((128, tmp_path / f"svg-{frac}"), (64, tmp_path / f"png-{frac}")):
            counts = emoji_data.build_dataset(out, image_size=size, val_fraction=frac, cache_root=svg_packages, progress=False)
            assert counts["val"] > 0 and counts["train"] > 0
            for split, rows in _rows(out).items():
                for r in rows:
                    split_by_name.setdefault(r["name"], set()).add(split)
                    base = {"FATHER CHRISTMAS": "1F385", "HEAVY BLACK HEART": "2764-FE0F"}.get(r["name"], r["unified"])
                    assert emoji_data.split_of(base, frac) == split, (r["file_name"], split)
        assert all(len(splits) == 1 for splits in split_by_name.values()), split_by_name
        assert {"FATHER CHRISTMAS", "HEAVY BLACK HEART", "red hair"} <= set(split_by_name)


def test_default_64px_run_is_unchanged(packages, tmp_path, no_npm, capsys):
    """The default run (no --image_size, no --styles) writes exactly what it wrote before the SVG styles
    existed: pinned from that version's output on this fixture (metadata.jsonl bytes, decoded pixels)."""
    out = tmp_path / "out64"
    frac = _val_fraction_with_both_splits()
    assert emoji_data.main(["--out", str(out), "--val_fraction", repr(frac), "--cache_root", str(packages)]) == 0
    assert "10 images (google: 4, twitter: 6); train 8, val 2" in capsys.readouterr().out
    digest = hashlib.sha256()
    for split in ("train", "val"):
        meta = (out / split / "metadata.jsonl").read_bytes()
        digest.update(split.encode() + meta)
        for line in meta.decode().splitlines():
            with Image.open(out / split / json.loads(line)["file_name"]) as im:
                digest.update(f"{im.mode} {im.size}".encode() + im.tobytes())
    assert digest.hexdigest() == "65cac11ad03a6aa39b44c64be1a19530e90b8c5b98cb6a90338788b21d8b7f51"
    assert sorted(p.name for p in packages.iterdir()) == ["emoji-datasource-google-16.0.0", "emoji-datasource-twitter-16.0.0"]


def test_a_missing_png_is_skipped_and_counted(packages, tmp_path, no_npm):
    (emoji_data.package_dir("twitter", packages) / "img" / "twitter" / "64" / "1fae0.png").unlink()
    counts = emoji_data.build_dataset(tmp_path / "out", cache_root=packages, progress=False)
    assert counts["styles"] == {"google": 4, "twitter": 5} and counts["skipped"]["twitter"] == {"missing file": 1}
    assert "twitter_1fae0.png" not in (tmp_path / "out" / "train" / "metadata.jsonl").read_text()


def test_cli_refuses_png_sets_at_other_sizes(tmp_path, capsys, no_npm):
    with pytest.raises(SystemExit):
        emoji_data.main(["--out", str(tmp_path / "o"), "--image_size", "128", "--styles", "noto,google",
                         "--cache_root", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert "google: these ship 64x64 PNGs only" in err and "noto" in err and "--image_size 64" in err
    with pytest.raises(SystemExit):
        emoji_data.main(["--out", str(tmp_path / "o"), "--image_size", "128", "--styles", "openmoji"])
    assert "Unknown style openmoji" in capsys.readouterr().err
    with pytest.raises(EmojiDataError, match="64x64 PNGs only"):
        emoji_data.build_dataset(tmp_path / "o", ["twitter"], image_size=128, cache_root=tmp_path / "empty")


def _package_tarball(tmp_path, key):
    """A .tgz of one fake package as npm packs it (package/...)."""
    src = write_package_tree(tmp_path / f"src-{key}", key)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            tar.add(path, arcname="package/" + path.relative_to(src).as_posix())
    name = emoji_data.package_dir(key, tmp_path).name
    path = tmp_path / f"{name}.tgz"
    path.write_bytes(buf.getvalue())
    return path, "sha512-" + base64.b64encode(hashlib.sha512(buf.getvalue()).digest()).decode()


@pytest.mark.parametrize("key, unpacked, count", [
    ("noto", ["LICENSE", "package.json", "sprites/all.svg"], 7),
    ("twemoji", ["license", "package.json", *sorted(TWEMOJI)], len(TWEMOJI)),
    ("fluent", ["LICENSE", "package.json", *(f"icons/{v}/{n}.svg" for v in ("flat", "modern") for n in FLUENT_NAMES),
                "icons/high-contrast/grinning-face.svg", "icons/high-contrast/santa-claus-default.svg"], 14),
    ("emojibase", ["LICENSE", "en/data.json", "package.json"], len(EMOJIBASE)),
])
def test_fetch_of_the_svg_packages_checks_the_pin_and_unpacks_what_is_used(tmp_path, monkeypatch, key, unpacked, count):
    tgz, integrity = _package_tarball(tmp_path, key)
    _npm_serving(tmp_path, monkeypatch, tgz, integrity)  # npm's report matches; the pinned value does not
    with pytest.raises(EmojiDataError, match="differs from the pinned"):
        emoji_data.ensure_package(key, tmp_path / "cache", quiet=True)
    assert not emoji_data.package_dir(key, tmp_path / "cache").exists()
    name, version, _ = emoji_data.PACKAGES[key]
    monkeypatch.setitem(emoji_data.PACKAGES, key, (name, version, integrity))
    folder = emoji_data.ensure_package(key, tmp_path / "cache", quiet=True)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted([*unpacked, emoji_data.MARKER])
    assert json.loads((folder / emoji_data.MARKER).read_text())["images"] == count
    assert emoji_data.is_complete(folder, key)
    monkeypatch.setattr(emoji_data.shutil, "which", lambda name: None)  # offline from now on
    assert emoji_data.ensure_package(key, tmp_path / "cache") == folder
