"""The latent explorer: a static web site to search, sort and click through an SAE's latents and images.

``mim-explore --sae SAE --store STORE --out DIR`` (:mod:`mim.explore.cli`) writes a folder that opens from
``file://`` or any static web server, with no server code and no build step:

- ``index.html``, ``explore.js``, ``explore.css``: one hash-routed page (``#/`` the latent table,
  ``#/latent/<id>`` a latent, ``#/image/<index>`` an image), plain JavaScript;
- ``data/*.js``: the data, as small script files that hand a JSON object to ``MIM.put(key, data)`` (a page
  opened from ``file://`` cannot ``fetch()`` files, but it can load scripts), loaded on demand;
- ``thumbs/sheet-NNNN.webp``: the images as sprite sheets, written once.

:mod:`mim.explore.build` computes and writes the data from a sparse latent cache (:mod:`mim.sae.cache`), the SAE
and the feature store's own images; :mod:`mim.explore.shards`, :mod:`mim.explore.thumbs` and
:mod:`mim.explore.neighbours` are its parts.
"""

from typing import Any

__all__ = ["ExploreError", "SiteSummary", "build_site"]


def __getattr__(name: str) -> Any:
    """``build_site``, ``ExploreError``, ``SiteSummary`` from :mod:`mim.explore.build`, imported on first use (it
    imports torch and Lightning: ``mim-explore --help`` stays fast)."""
    if name in __all__:
        from mim.explore import build

        return getattr(build, name)
    raise AttributeError(f"module 'mim.explore' has no attribute {name!r}")
