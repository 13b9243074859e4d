"""Great Expectations' Data Docs made to open offline.

GX 1.x writes pages that load Bootstrap, jQuery, bootstrap-table, Font Awesome, ... from CDNs
(its templates hard-code the URLs: the site builder's options add inline CSS at most, and its
custom views are looked up after the packaged templates, so they cannot replace them). On a
cluster with no network the index's table, which bootstrap-table fills from inline JSON, stays
empty, and every page is unstyled. So after each validation this module copies the files
vendored in flows/report/datadocs_assets/ (see its NOTICE.md) into the site's static/vendor/ folder
and points every page at them, relative to the page, so the site folder can be moved or zipped.

Remote URLs are matched by their file name, not their host, so a mirror or another CDN of the
same files is rewritten too; a remote asset with no local copy is left as it was and named in
the result (`unmapped`), which the tests treat as a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).with_name("datadocs_assets")
VENDOR = "static/vendor"

# The last part of a remote URL -> the vendored file (relative to datadocs_assets/).
_BY_NAME = {
    "bootstrap.min.css": "bootstrap/bootstrap.min.css",
    "bootstrap.min.js": "bootstrap/bootstrap.min.js",
    "jquery.min.js": "jquery/jquery.min.js",
    "popper.min.js": "popper/popper.min.js",
    "bootstrap-table.min.css": "bootstrap-table/bootstrap-table.min.css",
    "bootstrap-table.min.js": "bootstrap-table/bootstrap-table.min.js",
    "bootstrap-table-filter-control.min.css": "bootstrap-table/bootstrap-table-filter-control.min.css",
    "bootstrap-table-filter-control.css": "bootstrap-table/bootstrap-table-filter-control.min.css",
    "bootstrap-table-filter-control.min.js": "bootstrap-table/bootstrap-table-filter-control.min.js",
    "bootstrap-datepicker.min.css": "bootstrap-datepicker/bootstrap-datepicker.min.css",
    "bootstrap-datepicker.min.js": "bootstrap-datepicker/bootstrap-datepicker.min.js",
    "bootstrap-prefers-dark.css": "bootstrap-dark/bootstrap-prefers-dark.min.css",
    "all.min.css": "fontawesome/css/all.min.css",
}
_JQUERY = re.compile(r"^jquery-[\d.]+\.min\.js$")
# Vega draws the charts of profiling pages; our suites make none, so a page that does not call
# vegaEmbed loses the three script tags instead of waiting on them.
_VEGA = re.compile(r"^vega(-lite|-embed)?(@[\w.]+)?(\.min\.js)?$")

_TAG = re.compile(r"<(script|link|img)\b[^>]*>", re.IGNORECASE)
_ATTR = re.compile(r"""\s(src|href)\s*=\s*(["'])(https?://[^"']+)\2""", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\((["']?)(https?://[^"')]+)\1\)""")
# Subresource-integrity and CORS attributes make a browser refuse a file:// copy.
_SRI = re.compile(r"""\s(integrity|crossorigin)(\s*=\s*(["'])[^"']*\3)?""", re.IGNORECASE)


@dataclass
class OfflineResult:
    pages: int = 0
    rewritten: int = 0
    unmapped: set[str] = field(default_factory=set)


def site_root(out: str) -> str:
    return os.path.join(out, "validation", "gx", "uncommitted", "data_docs", "local_site")


def _vendored(url: str, page: str) -> str | None:
    """The vendored file for a remote URL ('' to drop the tag), or None when there is none."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if name in _BY_NAME:
        return _BY_NAME[name]
    if _JQUERY.match(name):
        return _BY_NAME["jquery.min.js"]
    if _VEGA.match(name) and "vegaEmbed" not in page:
        return ""
    return None


def _image(url: str, root: Path) -> str | None:
    """GX's logo images come from its web assets; the site ships the same logo locally."""
    name = url.split("?", 1)[0].rsplit("/", 1)[-1]
    local = root / "static" / "images" / name
    if local.is_file():
        return f"static/images/{name}"
    if "logo" in name and (root / "static" / "images" / "logo-long.png").is_file():
        return "static/images/logo-long.png"
    return None


def rewrite_page(text: str, page_dir: Path, root: Path, result: OfflineResult) -> str:
    """One page with every CDN asset pointed at the site's own copy."""

    def tag(m: re.Match[str]) -> str:
        whole, kind = m.group(0), m.group(1).lower()
        a = _ATTR.search(whole)
        if a is None:
            return whole
        if kind == "link" and not re.search(r"""rel\s*=\s*["']?stylesheet""", whole, re.I):
            return whole
        url = a.group(3)
        if kind == "img":
            local = _image(url, root)
        else:
            local = _vendored(url, text)
            if local == "":
                return "<script>" if kind == "script" else ""
            if local is not None:
                local = f"{VENDOR}/{local}"
        if local is None:
            result.unmapped.add(url)
            return whole
        rel = os.path.relpath(root / local, page_dir).replace(os.sep, "/")
        result.rewritten += 1
        new = whole[:a.start()] + f' {a.group(1)}="{rel}"' + whole[a.end():]
        return _SRI.sub("", new)

    def css_url(m: re.Match[str]) -> str:
        local = _image(m.group(2), root)
        if local is None:
            result.unmapped.add(m.group(2))
            return m.group(0)
        result.rewritten += 1
        return f"url('{os.path.relpath(root / local, page_dir).replace(os.sep, '/')}')"

    return _CSS_URL.sub(css_url, _TAG.sub(tag, text))


def copy_assets(root: Path) -> None:
    """The vendored files into the site's static/vendor/ (skipping those already there)."""
    for src in ASSETS.rglob("*"):
        if not src.is_file():
            continue
        dest = root / VENDOR / src.relative_to(ASSETS)
        if dest.exists() and dest.stat().st_size == src.stat().st_size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)


def make_offline(out: str) -> OfflineResult:
    """Point every page of OUT's Data Docs at local assets; safe to run again (GX rewrites the
    index and adds pages on each validation, so this runs after each one)."""
    result = OfflineResult()
    root = Path(site_root(out))
    if not (root / "index.html").is_file():
        return result
    copy_assets(root)
    for page in sorted(root.rglob("*.html")):
        if VENDOR in page.relative_to(root).as_posix():
            continue
        text = page.read_text(encoding="utf-8")
        new = rewrite_page(text, page.parent, root, result)
        result.pages += 1
        if new != text:
            tmp = page.with_name(f".{page.name}.tmp")
            tmp.write_text(new, encoding="utf-8")
            os.replace(tmp, page)
    return result
