"""The built site's layout in headless Chromium: code blocks that hide text, copy buttons over code, wide tables.

    mkdocs build --strict --site-dir /tmp/site
    python scripts/check_layout.py /tmp/site --width 1280 --shots /tmp/shots
    python scripts/check_layout.py /tmp/site --width 390 --pages configuration/index.html

Every page of the site is loaded at the given window width (served over HTTP from a
copy of the site into which a measuring script is written, under the path of the
site's `site_url`, as 404.html's absolute links expect) and reports, after the
theme's scripts have run:

- each code block whose text is wider than the block (`scrollWidth > clientWidth`:
  it scrolls sideways, so part of it is hidden), with the hidden width in pixels;
- each code block whose copy button covers a character of its text;
- each table that scrolls sideways, and whether the page itself does.

Exit status 1 when a code block hides text or a copy button covers code, 0
otherwise; tables are reported, not counted. `--shots DIR` saves a PNG of the top
of every page measured. Needs `chromium` (Debian's package).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MEASURE = r"""
<script>
setTimeout(() => {
  const px = (n) => Math.round(n);
  const hit = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  const report = {code: [], covered: [], tables: [], page: 0};
  document.querySelectorAll(".md-typeset pre > code").forEach((code, i) => {
    const lines = code.textContent.split("\n");
    const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), "");
    if (code.scrollWidth > code.clientWidth + 1) {
      report.code.push({block: i, hidden_px: code.scrollWidth - code.clientWidth, line: longest.slice(0, 90)});
    }
    const button = code.parentElement.querySelector(".md-code__nav, .md-clipboard");
    if (!button) return;
    const box = button.getBoundingClientRect();
    const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    const range = document.createRange();
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      range.selectNodeContents(node);
      const rects = [...range.getClientRects()];
      if (!rects.some((r) => r.top < box.bottom)) continue;
      for (let k = 0; k < node.length; k++) {
        if (!node.data[k].trim()) continue;
        range.setStart(node, k); range.setEnd(node, k + 1);
        if ([...range.getClientRects()].some((r) => hit(r, box))) {
          report.covered.push({block: i, text: node.data.trim().slice(0, 60)});
          return;
        }
      }
    }
  });
  document.querySelectorAll(".md-typeset__scrollwrap").forEach((wrap, i) => {
    if (wrap.scrollWidth > wrap.clientWidth + 1) report.tables.push({table: i, hidden_px: wrap.scrollWidth - wrap.clientWidth});
  });
  report.page = Math.max(0, document.documentElement.scrollWidth - window.innerWidth);
  const out = document.createElement("script");
  out.type = "application/json"; out.id = "layout-report"; out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
}, 1500);
</script>
"""
REPORT = re.compile(r'<script type="application/json" id="layout-report">(.*?)</script>', re.S)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    sys.exit("check_layout: no chromium on PATH; install it (Debian: apt-get install chromium)")


def _site_path(site: Path) -> str:
    """The path part of the site's `site_url` (`/untrainable/`), read from its sitemap; `/` without one."""
    sitemap = site / "sitemap.xml"
    found = re.search(r"<loc>([^<]+)</loc>", sitemap.read_text()) if sitemap.is_file() else None
    return urllib.parse.urlparse(found[1]).path if found else "/"


def _serve(root: Path, path: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}{path}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _browser(url: str, width: int, *extra: str, height: int = 1000) -> str:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += [f"--window-size={width},{height}", "--virtual-time-budget=4000", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def measure(page: str, base: str, width: int, shots: Path | None, height: int = 1000) -> dict:
    """One page's report (see the module's docstring), read back from the DOM Chromium dumps."""
    url = base + (page[: -len("index.html")] if page.endswith("index.html") else page)
    found = REPORT.search(_browser(url, width, "--dump-dom"))
    report = json.loads(found[1]) if found else {"error": "no report (the page did not finish loading)"}
    if shots is not None:
        name = page.replace("/index.html", "").replace("/", "_").replace(".html", "") or "index"
        _browser(url, width, f"--screenshot={shots / f'{name}-{width}.png'}", height=height)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="a built site (mkdocs build --site-dir SITE)")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels (default 1280)")
    parser.add_argument("--pages", nargs="*", help="pages to measure, relative to the site (default: every page)")
    parser.add_argument("--shots", type=Path, help="save a screenshot of each page measured into this folder")
    parser.add_argument("--shot-height", type=int, default=1000, help="height of the screenshots in CSS pixels")
    parser.add_argument("--jobs", type=int, default=2, help="browsers at once (default 2)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        parser.error(f"{args.site}: no index.html there; give the folder mkdocs built")
    with tempfile.TemporaryDirectory() as tmp:
        site_path = _site_path(args.site)
        root = Path(tmp) / "served" / site_path.strip("/")
        shutil.copytree(args.site, root)
        pages = args.pages or sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html"))
        for page in pages:
            html = root / page
            html.write_text(html.read_text().replace("</body>", MEASURE + "</body>", 1))
        if args.shots:
            args.shots.mkdir(parents=True, exist_ok=True)
        server, base = _serve(Path(tmp) / "served", site_path)
        try:
            with ThreadPoolExecutor(args.jobs) as pool:
                reports = dict(
                    zip(pages, pool.map(lambda p: measure(p, base, args.width, args.shots, args.shot_height), pages))
                )
        finally:
            server.shutdown()
    return _summary(reports, args.width)


def _summary(reports: dict[str, dict], width: int) -> int:
    blocks = covered = 0
    for page, report in reports.items():
        if "error" in report:
            print(f"{page}: {report['error']}")
            continue
        for code in report["code"]:
            print(f"{page}: code block {code['block']} hides {code['hidden_px']} px: {code['line']!r}")
        for code in report["covered"]:
            print(f"{page}: code block {code['block']}: the copy button covers {code['text']!r}")
        for table in report["tables"]:
            print(f"{page}: table {table['table']} scrolls sideways by {table['hidden_px']} px")
        if report["page"]:
            print(f"{page}: the page itself scrolls sideways by {report['page']} px")
        blocks += len(report["code"])
        covered += len(report["covered"])
    hiding = sum(1 for r in reports.values() if r.get("code"))
    errors = sum(1 for r in reports.values() if "error" in r)
    print(
        f"{width} px, {len(reports)} pages: {blocks} code blocks hide text on {hiding} pages; "
        f"{covered} copy buttons cover code; {errors} pages not measured"
    )
    return 1 if blocks or covered or errors else 0


if __name__ == "__main__":
    sys.exit(main())
