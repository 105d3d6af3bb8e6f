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


def make_package(folder, style):
    """A fake unpacked emoji-datasource-<style> folder: emoji.json + img/<style>/64/*.png."""
    img = folder / "img" / style / "64"
    img.mkdir(parents=True)
    (folder / "emoji.json").write_text(json.dumps(RECORDS))
    for i, e in enumerate(emoji_data.list_images(RECORDS, style)):
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
