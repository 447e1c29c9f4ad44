"""The latent explorer (``mim/explore``) in a real browser: a site built from a TopK SAE trained here on the real
CIFAR-10 features of the ``sae_stores`` fixture (ViT-Tiny/4, 8x8 patch tokens of d 192), opened in Debian's
Chromium through Playwright (``executable_path``: no browser download), from ``file://`` and from a static HTTP
server, every answer checked against the :class:`~mim.sae.cache.LatentCache` the build wrote.

Without Chromium (``chromium`` on PATH, or ``$MIM_CHROMIUM``) or Playwright the browser tests are skipped locally
and fail under CI (``$CI`` set): ``.ci/run`` installs Chromium."""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mim.explore import ExploreError, build_site
from mim.explore.heat import top_heat
from mim.features.store import FeatureStore
from mim.sae.cache import LatentCache, LatentCacheError
from mim.sae.models import TopKSAE, save_sae

D_MODEL, D_SAE, K_SAE, TOP = 192, 256, 8, 32
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.filterwarnings("ignore:Couldn't infer the batch indices")


def chromium_path() -> str | None:
    return os.environ.get("MIM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sae_file(sae_stores, tmp_path_factory) -> Path:
    """A TopK SAE (256 latents, k 8) trained for 60 Adam steps on the 12,800 real train patch tokens (one torch
    thread: these small steps run 6x faster so on a busy 2-core machine)."""
    x = FeatureStore(sae_stores[0]).read("patch").features.reshape(-1, D_MODEL).float()
    torch.manual_seed(0)
    sae = TopKSAE(d_model=D_MODEL, d_sae=D_SAE, k=K_SAE)
    sae.initialize(x[::4])
    optimizer = torch.optim.Adam(sae.parameters(), lr=4e-3)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(60):
            out = sae.loss(sae.normalize(x[torch.randint(len(x), (1024,))]))
            optimizer.zero_grad()
            out.loss.backward()
            sae.remove_parallel_grad_()
            optimizer.step()
            sae.normalize_decoder_()
            losses.append(float(out.terms["mse"].detach()))
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])  # it learned
    return save_sae(sae.eval(), tmp_path_factory.mktemp("explore_sae") / "sae.safetensors")


@pytest.fixture(scope="module")
def built(sae_file, sae_stores, shared_data, tmp_path_factory):
    """The site of the SAE on the real val store (100 images), its cache encoded in the build (kept), and a
    folder for screenshots."""
    root = tmp_path_factory.mktemp("explore")
    summary = build_site(sae_file, sae_stores[1], root / "site", cache_out=root / "cache", data_root=shared_data,
                         k=TOP)
    shots = root / "screenshots"
    shots.mkdir()
    return summary, LatentCache(root / "cache"), shots


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        path = None
    if path is None:
        message = "Chromium (Debian package chromium) or Playwright for Python is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the browser tests (.ci/run installs chromium).")
        pytest.skip(message)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(built):
    """The site served by Python's static file server (``python -m http.server``'s handler) on a free port."""
    handler = functools.partial(Quiet, directory=str(built[0].path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class Page:
    """A browser page on the site that records console errors, page errors and failed requests."""

    def __init__(self, browser, base: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.base, self.errors = base, []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))

    def open(self, hash_: str, view: str):
        self.page.goto(self.base + hash_)
        self.page.wait_for_selector(f"#view[data-view={view}][data-state=ready]", timeout=10_000)
        return self.page

    def rows(self) -> list[int]:
        ids = self.page.eval_on_selector_all("#latent-table tbody tr", "rs => rs.map(r => r.dataset.latent)")
        return [int(v) for v in ids]

    def close(self) -> None:
        self.page.close()
        assert self.errors == []


def file_base(built) -> str:
    return (built[0].path / "index.html").as_uri()


def busiest(cache: LatentCache) -> int:
    """A latent positive on the most images (ties: smallest id), so its page shows k images."""
    return int(torch.argmax(cache.stats().image_count))


# ------------------------------------------------------------------------------------------------ the build
def test_build_writes_a_static_site(built, sae_file, sae_stores, shared_data):
    summary, cache, _ = built
    site = summary.path
    assert summary.latents == D_SAE == cache.d_sae and summary.images == len(cache) == 100
    for name in ("index.html", "explore.js", "explore.css", "data/meta.js", "data/latents.js",
                 "data/latent/00000.js", "data/latent/00003.js", "data/image/00001.js"):
        assert (site / name).is_file(), name
    assert len(list((site / "thumbs").glob("sheet-*.*"))) == 1
    assert not (site / ".cache").exists() and not list(site.parent.glob("site.tmp-*"))
    html = (site / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from a CDN: works offline
    # a failing rebuild (a cache that is not there) leaves the site as it was, and no temporary folder
    before = (site / "data" / "meta.js").read_bytes()
    with pytest.raises(LatentCacheError, match="does not exist"):
        build_site(sae_file, sae_stores[1], site, cache=site.parent / "no_cache", data_root=shared_data)
    assert (site / "data" / "meta.js").read_bytes() == before and not list(site.parent.glob("site.tmp-*"))
    with pytest.raises(ExploreError, match="not an explorer site"):
        build_site(sae_file, sae_stores[1], site.parent, data_root=shared_data)  # holds site/, cache/, ...


def test_top_heat_equals_top_images(built):
    cache = built[1]
    heat = top_heat(cache, TOP)
    for j in range(D_SAE):
        top = cache.top_images(j, k=TOP)
        lo, hi = heat.starts[j], heat.starts[j + 1]
        assert heat.images[lo:hi].tolist() == top.images.tolist() and heat.labels[lo:hi].tolist() == top.labels.tolist()
        assert np.array_equal(heat.scores[lo:hi], top.scores.numpy())
        maps = np.zeros((hi - lo, 64), np.float32)
        for p in range(lo, hi):
            entries = slice(heat.offsets[p], heat.offsets[p + 1])
            maps[p - lo, heat.tokens[entries]] = heat.values[entries]
        assert np.array_equal(maps, top.maps.reshape(-1, 64).numpy())


def test_cli_user_errors_are_one_line(sae_file, sae_stores, tmp_path, capsys):
    from mim.explore.cli import main

    missing = tmp_path / "no_store"
    with pytest.raises(SystemExit) as exit_:
        main(["--sae", str(sae_file), "--store", str(missing), "--out", str(tmp_path / "site"), "--quiet"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mim: error:") and str(missing) in lines[0], lines
    assert not (tmp_path / "site").exists() and not list(tmp_path.glob("site.tmp-*"))
    narrow = save_sae(TopKSAE(d_model=96, d_sae=64, k=4), tmp_path / "narrow.safetensors")
    with pytest.raises(SystemExit):
        main(["--sae", str(narrow), "--store", str(sae_stores[1]), "--out", str(tmp_path / "site"), "-q"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "d_model 192" in lines[0] and "d_model 96" in lines[0], lines
    scripts = importlib.metadata.entry_points(group="console_scripts", name="mim-explore")
    assert [s.value for s in scripts] == ["mim.explore.cli:main"]  # pip install -e . made the console script


# ------------------------------------------------------------------------------------------------ in Chromium
def test_table_lists_sorts_and_searches(built, browser):
    _, cache, shots = built
    frequency = cache.frequency()
    page = Page(browser, file_base(built))
    p = page.open("#/", "table")
    p.select_option("#page-size", "0")  # all rows on one page
    assert sorted(page.rows()) == list(range(D_SAE))
    assert p.get_attribute("#latent-table", "data-total") == str(D_SAE)
    p.click("th[data-key=freq]")  # most frequent first
    rows = page.rows()
    assert frequency[rows[0]] == frequency.max()
    assert bool((frequency[rows].diff() <= 0).all())
    assert p.get_attribute("th[data-key=freq]", "aria-sort") == "descending"
    p.select_option("#page-size", "50")
    p.screenshot(path=str(shots / "table.png"))
    target = int(torch.argsort(frequency)[D_SAE // 2])
    p.fill("#search", str(target))
    assert page.rows()[0] == target and all(str(j).startswith(str(target)) for j in page.rows())
    p.press("#search", "Enter")  # Enter on an exact id opens its page
    p.wait_for_selector(f"#view[data-view=latent][data-state=ready] [data-latent='{target}']")
    page.close()


def test_latent_page_heat_maps_equal_the_cache(built, browser):
    _, cache, shots = built
    latent = busiest(cache)
    top = cache.top_images(latent, k=TOP)
    assert len(top.images) == TOP  # the val store has 100 images: the busiest latent fills all k
    page = Page(browser, file_base(built))
    p = page.open(f"#/latent/{latent}", "latent")
    shown = p.eval_on_selector_all("#top-images a.thumb-link", "as => as.map(a => +a.dataset.image)")
    assert shown == top.images.tolist()
    heat = np.array(p.eval_on_selector_all("#top-images canvas.heat",
                                           "cs => cs.map(c => c.dataset.heat.split(',').map(Number))"))
    expected = top.maps.reshape(TOP, -1).numpy()
    assert heat.shape == expected.shape == (TOP, 64)
    np.testing.assert_allclose(heat, expected, rtol=1e-3, atol=1e-6)  # float16 on the wire
    assert ((heat != 0) == (expected != 0)).all()
    assert p.is_visible("#top-images canvas.heat")
    p.uncheck("#heat-toggle")
    assert not p.is_visible("#top-images canvas.heat")
    p.check("#heat-toggle")
    stats = cache.stats()
    bars = p.eval_on_selector_all("#histogram rect", "rs => rs.map(r => +r.dataset.count)")
    assert bars == stats.hist[latent].tolist()
    assert len(p.query_selector_all("#classes li")) == 10 and len(p.query_selector_all("#neighbours li")) == 8
    p.screenshot(path=str(shots / "latent.png"), full_page=True)
    page.close()


def test_patch_click_lists_the_cached_latents(built, browser):
    _, cache, shots = built
    latent = busiest(cache)
    image = int(cache.top_images(latent, k=1).images[0])
    page = Page(browser, file_base(built))
    p = page.open(f"#/latent/{latent}", "latent")
    p.click(f"#top-images a[data-image='{image}']")  # a top image links to its page
    p.wait_for_selector(f"#view[data-view=image][data-state=ready] [data-image='{image}']")
    for token in (0, 27, 63):
        p.click(f"#patches button[data-token='{token}']")
        p.wait_for_selector(f"#token-latents[data-token='{token}']")
        ids, values = cache.token_latents(image, token)
        shown = p.eval_on_selector_all("#token-latents li", "ls => ls.map(l => [+l.dataset.latent, +l.dataset.value])")
        assert sorted(j for j, _ in shown) == ids.tolist()  # exactly the cached latents
        by_id = dict(shown)
        np.testing.assert_allclose([by_id[j] for j in ids.tolist()], values.numpy(), rtol=1e-3)
    scores = cache.dense(image).amax(0)  # the image's top latents: max over its patches
    first = p.eval_on_selector_all("#image-top li", "ls => ls.map(l => +l.dataset.latent)")
    assert first[0] == int(scores.argmax()) and len(first) == min(20, int((scores > 0).sum()))
    p.screenshot(path=str(shots / "image.png"), full_page=True)
    page.close()


def test_site_works_over_http(built, browser, server):
    cache = built[1]
    latent = busiest(cache)
    page = Page(browser, server)
    p = page.open("", "table")
    assert p.get_attribute("#latent-table", "data-total") == str(D_SAE)
    p.click(f"#latent-table a[data-latent='{int(page.rows()[0])}']")
    p.wait_for_selector("#view[data-view=latent][data-state=ready]")
    p.goto(f"{server}#/latent/{latent}")
    p.wait_for_selector(f"#view[data-view=latent][data-state=ready] [data-latent='{latent}']")
    assert len(p.query_selector_all("#top-images canvas.heat")) == TOP
    page.close()
